"""The end of a study invocation: evaluate the chosen model once on the test split and register it.

The chosen model is the best trial's own network (rebuilt from the weights its run kept) or, with
``--refit``, the best configuration retrained on train+val. Its test evaluation and its MLflow model
are logged into that trial's run (or the refit run), so the registered version links to the run
holding its parameters and curves. The alias rule lives in :func:`train.tracking.promote`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient

from train.config import TrainConfig, registered_name
from train.data import ImageData
from train.engine import FitResult, Runtime, evaluate, fit, resolve_precision, select_device
from train.models import create_model
from train.tracking import epoch_logger, flat_params, load_weights, log_fit, promote, register_model, run_tags

from . import ddp
from .objective import WEIGHTS_ARTIFACT

REGISTERED_ATTR = "registered_versions"  # {trial number: model version}


def _trial_network(run_id: str, cfg: TrainConfig, data: ImageData) -> torch.nn.Module:
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=WEIGHTS_ARTIFACT))
    return load_weights(create_model(cfg.model, data.num_classes, data.channels, **cfg.model_args),
                        local / "weights.safetensors")


def _log_trial_model(best: optuna.trial.FrozenTrial, cfg: TrainConfig, data: ImageData) -> tuple[str, dict[str, Any]]:
    """Evaluate the best trial's own network on test and log it, with its report, into the trial run."""
    run_id = best.user_attrs["mlflow_run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    rt = Runtime.create(cfg, data)
    model = rt.place(_trial_network(run_id, cfg, data))
    test = evaluate(model, data.test_x, data.test_y, rt, cfg.tta)
    history = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="history.json")).read_text())
    metrics = run.data.metrics
    result = FitResult(model, cfg, history, None, test, metrics.get("train_seconds", 0.0),
                       metrics.get("train_images_per_sec", 0.0), str(rt.device), rt.precision)
    with mlflow.start_run(run_id=run_id):
        logged = log_fit(result, data)
    # reopening the run must not change its recorded duration or state
    client.set_terminated(run_id, status=run.info.status, end_time=run.info.end_time)
    return run_id, logged


LENGTH = ("subset", "epochs", "max_steps")  # how much a trial trains: a budgeted search's trials train less


def refit_config(cfg: TrainConfig, seconds: float | None = None, progress: bool = True,
                 length: TrainConfig | None = None, searched: Iterable[str] = ()) -> TrainConfig:
    """The best trial's configuration for its refit: train + validation, tested once at the end. With
    ``seconds`` (a budgeted study) on every training image, for as long as the budget leaves; else as long
    as ``length`` (this command's trials) says, whatever the trial itself trained: the best trial may come
    from an earlier invocation's low-fidelity search (a subset, a few epochs). Without a validation split
    there is nothing to stop early on or to pick a best epoch by: the refit trains its length."""
    cfg = dataclasses.replace(cfg, val_fraction=0.0, evaluate_test=True, progress=progress, patience=None,
                              restore_best=False)
    if seconds is not None:
        cfg = dataclasses.replace(cfg, subset=None, time_budget=seconds, max_steps=None)
    elif length is not None:
        cfg = dataclasses.replace(cfg, **{k: getattr(length, k) for k in LENGTH if k not in searched})
    return cfg


def _refit(study: optuna.Study, best: optuna.trial.FrozenTrial | None, cfg: TrainConfig, data: ImageData,
           experiment_id: str, parent_run_id: str, seconds: float | None = None,
           progress: bool = True, length: TrainConfig | None = None) -> tuple[str, dict[str, Any]]:
    """Retrain the best trial's configuration (or, with no trial, the base one) on train+val, then
    evaluate once on test."""
    cfg = refit_config(cfg, seconds, progress, length, () if best is None else best.params)
    device = select_device(cfg.device)
    what = "the base" if best is None else f"trial {best.number}'s"
    tags = {"optuna.study": study.study_name, "optuna.trial": "none" if best is None else str(best.number),
            "kind": "refit", **run_tags(cfg, data, str(device), resolve_precision(cfg.precision, device))}
    with mlflow.start_run(experiment_id=experiment_id, run_name="refit-base" if best is None else f"refit-trial-{best.number}",
                          parent_run_id=parent_run_id, tags=tags) as run:
        mlflow.log_params(flat_params(cfg))
        length = f"{cfg.time_budget:.0f} s budget" if cfg.time_budget else f"{cfg.epochs} epochs"
        images = len(data.train_y) if cfg.subset is None else cfg.subset
        print(f"[refit] {what} configuration on train+val ({images:,} images, {length}), "
              "then [test] on the test split", flush=True)
        ddp.tell(ddp.REFIT, cfg.to_dict())  # under --nproc the other ranks train it with us
        result = fit(cfg, data, [epoch_logger])
        return run.info.run_id, log_fit(result, data)


def _register(data: ImageData, cfg: TrainConfig, run_id: str, logged: dict[str, Any],
              tags: dict[str, Any]) -> dict[str, Any]:
    """Register the logged model under the champion/challenger rule; tags say where it came from."""
    name = registered_name(data.name)
    test_acc = float(logged["summary"]["test_acc"])
    tags = {**tags, "test_acc": test_acc, "run_id": run_id, "dataset": data.name, "model": cfg.model,
            "lr": cfg.lr, "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay}
    print(f"[register] {name}: test accuracy {test_acc:.4f}", flush=True)
    mv = register_model(logged["model_info"].model_uri, name, tags)
    return {"name": name, "version": mv.version, "alias": promote(name, mv.version, test_acc), "test_acc": test_acc,
            "run_id": run_id, "trained": {"lr": cfg.lr, "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay}}


def register_base(study: optuna.Study, base: TrainConfig, params: dict[str, Any], data: ImageData,
                  experiment_id: str, parent_run_id: str, seconds: float, progress: bool = True) -> dict[str, Any]:
    """No search (a budget too short for one that ranks anything): refit the base configuration on
    train+val for ``seconds``, test it once and register it; ``params`` are its values of the searched
    dimensions."""
    run_id, logged = _refit(study, None, base, data, experiment_id, parent_run_id, seconds, progress)
    tags = {"study": study.study_name, "search": "skipped", "params": json.dumps(params, sort_keys=True),
            "refit": True, **{f"param.{k}": v for k, v in params.items()}}
    return {**_register(data, base, run_id, logged, tags), "params": params}


def register_best(study: optuna.Study, data: ImageData, experiment_id: str, parent_run_id: str,
                  refit: bool = False, refit_seconds: float | None = None, progress: bool = True,
                  length: TrainConfig | None = None) -> dict[str, Any] | None:
    """Test-evaluate and register the study's best trial; returns what was registered (or None). A refit
    without ``refit_seconds`` trains as long as ``length`` (this command's trial configuration) says."""
    try:
        best = study.best_trial
    except ValueError:
        print("no trial completed: nothing to register")
        return None
    name = registered_name(data.name)
    v = study.user_attrs.get(REGISTERED_ATTR, {}).get(str(best.number))
    if v is not None and not refit:
        print(f"best trial {best.number} is already version {v} of {name}: nothing new to register")
        return {"name": name, "version": v, "trial": best.number, "already": True}
    cfg = TrainConfig.from_dict(best.user_attrs["config"])
    if refit:
        run_id, logged = _refit(study, best, cfg, data, experiment_id, parent_run_id, refit_seconds, progress, length)
    else:
        run_id, logged = _log_trial_model(best, cfg, data)
    tags = {"study": study.study_name, "trial": best.number, "params": json.dumps(best.params, sort_keys=True),
            "val_acc": best.value, "refit": refit, **{f"param.{k}": v for k, v in best.params.items()}}
    out = _register(data, cfg, run_id, logged, tags)
    # a finished trial is read-only in Optuna, so the study remembers which trials became versions
    study.set_user_attr(REGISTERED_ATTR, {**study.user_attrs.get(REGISTERED_ATTR, {}), str(best.number): str(out["version"])})
    return {**out, "trial": best.number, "val_acc": best.value, "params": best.params}
