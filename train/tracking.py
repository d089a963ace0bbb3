"""Everything MLflow: the store, runs, metrics, plots, the logged model and the registry.

The default store is SQLite inside ``./mlruns`` with artifacts beside it, so ``mlflow ui`` and the
model registry work with no server; ``MLFLOW_TRACKING_URI`` points everything at a real server.
A logged model carries what serving needs (class names, input size, channels, mean/std, the
architecture) as MLflow metadata, plus pickle-free safetensors weights for Grad-CAM.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from .config import CHAMPION, TrainConfig
from .data import ImageData, project_root
from .errors import TrackingError
from .distributed import env_context
from .engine import FitResult
from .lineage import log_datasets, model_card
from .files import file_lock
from .machine import machine_tags
from .pyfunc import log_model as log_pytorch_with_serving
from .report import classification_metrics, metrics_by_part, part_metrics, plot_confusion, plot_curves

MODEL_ARTIFACT = "model"


# --------------------------------------------------------------------------- the store


def mlruns_dir() -> Path:
    return Path(os.environ.get("RESLAB_MLRUNS", Path.cwd() / "mlruns")).expanduser().resolve()


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def server_environment() -> dict[str, str]:
    """The environment for an ``mlflow server`` that reslab starts: this process's, with MLflow's job
    execution off unless it says otherwise. MLflow 3's server otherwise starts a job runner and
    seven huey consumer processes for its GenAI jobs (LLM judges, prompt optimisation), which reslab's store
    has none of: 10 processes instead of 2, ~1.4 GB more memory and ~16 CPU-seconds more at each start on a
    2-core CPU (docs/scale-out.md)."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def is_local_store(uri: str) -> bool:
    """True for the embedded SQLite store in ``mlruns/`` (its artifacts then live there too)."""
    return uri == f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def setup_tracking(uri: str | None = None) -> str:
    """Point MLflow at the store and check it works, so a bad store fails now, not after training."""
    uri = uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        bound_http_retries()
        try:
            with urllib.request.urlopen(health_request(uri), timeout=10) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({e}); start it or fix MLFLOW_TRACKING_URI") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as e:
            raise TrackingError(f"MLflow store folder {folder} is not writable ({e.strerror or e})") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def health_request(uri: str) -> urllib.request.Request:
    """GET <server>/health. urllib refuses ``user:password@`` in a URL ("nonnumeric port", with the password
    in the message), so the userinfo becomes a Basic auth header, as MLflow's client (requests) sends it;
    without userinfo, MLFLOW_TRACKING_USERNAME/PASSWORD are sent, as MLflow does."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    user, password = parts.username, parts.password
    if user is None:
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    else:
        user, password = urllib.parse.unquote(user), urllib.parse.unquote(password or "")
    netloc = parts.netloc.rpartition("@")[2]
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health")
    if user and password is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    return req


def bound_http_retries() -> None:
    """MLflow's client retries a lost server with backoff 2 x 2^n s, 7 times: about 4 minutes per call, and a
    failing trial makes several calls. reslab processes retry for about RESLAB_TRACKING_RETRY_SECONDS
    (default 60: waits of 2, 4, 8, 16, 32 s) unless MLflow's own variables are set."""
    seconds = float(os.environ.get("RESLAB_TRACKING_RETRY_SECONDS", "60"))
    retries = 1
    while 2**retries - 2 < seconds and retries < 10:  # n retries wait 0, 2, 4, ..., 2^(n-1) s: 2^n - 2 in all
        retries += 1
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))


def tracking_outage(e: BaseException) -> bool:
    """An MLflow call that failed because the server could not be reached (after the client's retries)."""
    import requests

    while e is not None:
        if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
            return True
        if isinstance(e, mlflow.exceptions.MlflowException) and (
                "Max retries exceeded" in str(e) or "Connection refused" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def tracking_gone(e: BaseException) -> bool:
    """Whether ``e`` is a tracking outage that outlasted the client's retries; if so, later MLflow calls of this
    process (cleanup, MLflow's own end_run at exit) try once instead of waiting out the window again."""
    if not tracking_outage(e):
        return False
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    return True


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def experiment_id(name: str) -> str:
    """Get or create an experiment; local stores keep artifacts under ``mlruns/artifacts``."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if is_local_store(mlflow.get_tracking_uri()):
        location = (mlruns_dir() / "artifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


# --------------------------------------------------------------------------- runs


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: TrainConfig, data: ImageData, device: str, precision: str) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "device": device,
        "precision": precision,
        "torch_version": torch.__version__,
        "dataset": data.name,
        "dataset_source": data.source,
        "dataset_hash": data.fingerprint,
        "model": cfg.model,
        "world_size": str(env_context().world_size),  # processes training it (reslab train/tune --nproc)
        **machine_tags(torch.get_num_threads()),  # cpu_model, cpu_avx512_bf16, cpu_cores, torch_threads
    }


def flat_params(cfg: TrainConfig) -> dict[str, str]:
    out = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": str(vv) for kk, vv in v.items()})
        else:
            out[k] = str(v)
    return out


def epoch_logger(epoch: int, metrics: dict[str, float]) -> None:
    """Engine callback: one MLflow step per epoch."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k not in ("epoch", "step")}, step=epoch + 1)
    if "val_acc" in metrics and "wall_seconds" in metrics:  # time-to-accuracy: step = wall-clock seconds
        mlflow.log_metric("val_acc_by_wall_second", float(metrics["val_acc"]), step=round(metrics["wall_seconds"]))


# --------------------------------------------------------------------------- models


def model_metadata(cfg: TrainConfig, data: ImageData) -> dict[str, Any]:
    return {**data.metadata(), "architecture": cfg.model, "model_args": dict(cfg.model_args), "input_layout": "NCHW float32, normalised"}


def save_weights(model: nn.Module, path: Path) -> Path:
    """The network's weights as a safetensors file (no pickle: loading it cannot run code)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the weights of a file written by :func:`save_weights`."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


def log_model(model: nn.Module, cfg: TrainConfig, data: ImageData, registered_name: str | None = None) -> Any:
    """Log the network as a pt2 (torch.export) model with a signature, an input example, the
    preprocessing metadata, and safetensors weights + config for rebuilding it as a module."""
    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
    example = np.random.default_rng(0).standard_normal((2, data.channels, data.image_size, data.image_size)).astype(np.float32)
    with torch.no_grad():
        out = cpu_model(torch.from_numpy(example)).numpy()
    meta = model_metadata(cfg, data)
    with tempfile.TemporaryDirectory() as tmp:
        weights, config = Path(tmp) / "weights.safetensors", Path(tmp) / "model_config.json"
        save_weights(cpu_model, weights)
        config.write_text(json.dumps(meta, indent=2))
        return log_pytorch_with_serving(  # + image/tensor REST serving (train/pyfunc.py)
            cpu_model,
            name=MODEL_ARTIFACT,
            serialization_format="pt2",
            signature=infer_signature(example, out),
            input_example=example,
            metadata=meta,
            extra_files=[str(weights), str(config)],
            registered_model_name=registered_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


def log_fit(result: FitResult, data: ImageData, registered_name: str | None = None, log_model_: bool = True) -> dict[str, Any]:
    """Log a finished fit into the active run: summary metrics, reports, plots and the model."""
    summary: dict[str, float] = {"train_seconds": result.train_seconds, "train_images_per_sec": result.images_per_sec}
    if result.history:
        summary["best_val_acc"] = result.best_val_accuracy
    if result.val is not None:
        summary["final_val_acc"] = result.val.accuracy
    summary["epochs_run"] = float(result.config.epochs)
    summary["train_images"] = float(result.extra.get("train_images", 0))
    summary.update(result.extra.get("budget", {}))  # a budgeted run: the budget, the horizon it chose, its wall time
    stopping = result.extra.get("stopping", {})  # best_epoch, model_epoch (whose weights follow), stopped_epoch
    summary.update(stopping)
    if result.config.patience is not None:
        mlflow.set_tag("early_stopped", str("stopped_epoch" in stopping).lower())
    report: dict[str, Any] = {}
    inputs = log_datasets(result.config, data, result.test is not None)  # contexts train/validation/test
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        if result.history:
            mlflow.log_artifact(str(plot_curves(result.history, t / "curves.png", f"{result.config.model} on {data.name}")), "plots")
        if result.test is not None:
            report = classification_metrics(result.test.labels, result.test.preds, data.classes)
            summary.update(
                test_acc=report["accuracy"], test_loss=result.test.loss,
                test_precision_macro=report["precision_macro"], test_recall_macro=report["recall_macro"],
                test_f1_macro=report["f1_macro"], eval_images_per_sec=result.test.images_per_sec,
            )
            summary.update({f"test_f1_{c}": v["f1-score"] for c, v in report["per_class"].items()})
            report["parts"] = metrics_by_part(result.test.labels, result.test.preds, data.classes, data.test_parts())
            summary.update(part_metrics(report["parts"]))
            cm_path = plot_confusion(report["confusion_matrix"], data.classes, t / "confusion_matrix.png")
            mlflow.log_artifact(str(cm_path), "plots")
            (t / "test_report.json").write_text(json.dumps(report, indent=2))
            mlflow.log_artifact(str(t / "test_report.json"))
        (t / "history.json").write_text(json.dumps(result.history, indent=1))
        mlflow.log_artifact(str(t / "history.json"))
    test_metrics = {k: summary.pop(k) for k in list(summary) if k.startswith("test_")}
    mlflow.log_metrics(summary)
    info = log_model(result.model, result.config, data, registered_name) if log_model_ else None
    if test_metrics:  # on the logged model's page too, against the test dataset
        mlflow.log_metrics(test_metrics, model_id=info.model_id if info else None, dataset=inputs.get("test"))
        summary.update(test_metrics)
    return {"summary": summary, "report": report, "model_info": info}


def register_model(model_uri: str, name: str, tags: dict[str, Any] | None = None) -> Any:
    """Register ``model_uri`` as a new version of ``name`` with its tags (one call), and write the
    version's description: a short model card from its run (train/lineage.py)."""
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    client = MlflowClient()
    return client.update_model_version(name, mv.version, description=model_card(client, name, mv.version))


def load_model(uri: str) -> nn.Module:
    """Load a logged pt2 model back as a callable module (no pickle involved)."""
    return mlflow.pytorch.load_model(uri)


def resolve_model_uri(model: str) -> str:
    """What the user typed -> an MLflow model URI (or a local folder): a run id, ``name@alias`` or ``name/version``
    without the scheme, or a URI as it is."""
    if re.fullmatch(r"[0-9a-f]{32}", model):  # a run id
        return f"runs:/{model}/{MODEL_ARTIFACT}"
    if "://" not in model and ":/" not in model and not Path(model).exists() and re.fullmatch(r"[\w.-]+(@[\w-]+|/\d+)", model):
        return f"models:/{model}"  # name@alias or name/version without the scheme
    return model


def model_files(uri: str) -> tuple[dict[str, Any], Path]:
    """Download a logged model's config and safetensors weights (``uri`` in any form resolve_model_uri takes, as
    ``--init-from`` gets it); return (config, weights path)."""
    local = Path(mlflow.artifacts.download_artifacts(resolve_model_uri(uri)))
    extra = local / "extra_files"
    return json.loads((extra / "model_config.json").read_text()), extra / "weights.safetensors"


def rebuild_module(uri: str) -> tuple[nn.Module, dict[str, Any]]:
    """The logged network as an ``nn.Module`` (for Grad-CAM, fine-tuning), through the registry."""
    from .models import create_model

    cfg, weights = model_files(uri)
    model = create_model(cfg["architecture"], len(cfg["classes"]), cfg["channels"], **cfg.get("model_args", {}))
    return load_weights(model, weights).eval(), cfg


def alias_lock(registry_uri: str) -> Path | None:
    """The lock file beside a store on this host's disk (SQLite, a folder), which every process promoting a
    version into it takes; None for a server or a database elsewhere, which no file can lock."""
    if registry_uri.startswith("sqlite:///"):
        db = Path(registry_uri.removeprefix("sqlite:///"))
        return db.with_name(db.name + ".aliases.lock")
    if "://" not in registry_uri or registry_uri.startswith("file:"):
        folder = Path(registry_uri.removeprefix("file://").removeprefix("file:"))
        return folder / ".aliases.lock" if folder.is_dir() else None
    return None


NO_SUCH_ALIAS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")  # what MLflow raises for a missing alias


def tagged_accuracy(version: Any) -> float:
    """A registry version's ``test_acc`` tag; NaN when it is missing or not a number (edited by hand)."""
    try:
        return float(version.tags.get("test_acc", "nan"))
    except (TypeError, ValueError):
        return float("nan")


def promote(name: str, version: str | int, test_acc: float) -> str:
    """The alias rule: ``champion`` moves to this version only if its test accuracy beats the current
    champion's (or there is none); otherwise the version becomes ``challenger``.

    MLflow sets an alias unconditionally, so two studies finishing together could each read the old champion
    and the last to write would win, the worse one included. On a local store they take turns under a lock
    file. A tracking server has no lock: the alias is read again after it is written and written again if a
    worse version took it in between, which narrows the race but does not close it (docs/tuning-reference.md)."""
    client, version = MlflowClient(), str(version)
    with file_lock(alias_lock(mlflow.get_registry_uri())):
        alias = CHAMPION
        for _ in range(3):
            try:
                champ = client.get_model_version_by_alias(name, CHAMPION)
            except mlflow.exceptions.MlflowException as e:
                if e.error_code not in NO_SUCH_ALIAS:  # a server error is not "no champion": a worse version
                    raise  # would take the alias from a better one
                champ = None
            if champ is not None and str(champ.version) == version:
                return alias
            current = tagged_accuracy(champ) if champ is not None else float("nan")
            alias = CHAMPION if champ is None or not np.isfinite(current) or test_acc > current else "challenger"
            client.set_registered_model_alias(name, alias, version)
            if alias != CHAMPION:
                break
        return alias
