"""One trial = one training run, nested under the study's parent run in MLflow.

The objective trains on the train split, reports validation accuracy after every epoch (so the
pruner can stop poor trials) and returns the final validation accuracy. The test split is never
touched here (``evaluate_test=False``). A trial that diverges or runs out of memory is failed with
its reason recorded; the study goes on.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch

from train.config import TrainConfig
from train.data import ImageData
from train.engine import DivergedError, EpochCallback, fit, resolve_precision, select_device
from train.errors import ReslabWarning
from train.interrupt import end_reason
from train.tracking import epoch_logger, first_line, flat_params, log_fit, run_tags, tracking_gone
from train.tracking import save_weights as store_weights

from . import ddp, storage
from .pruning import pruning_callback
from .space import SearchSpace

WEIGHTS_ARTIFACT = "trial_model"  # safetensors weights of every finished trial; only the winner gets a full model
MLFLOW_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


def worker_id() -> str:
    """host:pid:start of this process, so a worker on the same host can tell that it died (tune/storage.py)."""
    return storage.worker_id()


class TrialFailed(Exception):
    """A trial that cannot finish (diverged, out of memory); Optuna records it as FAIL and goes on."""


OOM_MESSAGES = (
    "out of memory",  # CUDA and others
    "can't allocate memory",  # PyTorch's CPU allocator
    # oneDNN (CPU convolutions) reports a failed allocation of its primitive or scratchpad only as this;
    # seen under a memory cap in tests/test_tune_paths.py, where it crashed the whole study
    "could not create a primitive",
)


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES))


def beat_now(trial: optuna.Trial) -> None:
    """Write the trial's first heartbeat before it does anything. Optuna's first one comes from a thread that
    may not have run yet when the worker is killed, and a RUNNING trial without a heartbeat row is never
    stale, so no worker would ever fail and retry it (a fresh-clone run of test_scaleout waited 120 s for one)."""
    storage = getattr(trial.study, "slot_storage", None)
    if isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval:
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(trial.study.slot_study_id, trial.number))


class Objective:
    def __init__(self, base: TrainConfig, space: SearchSpace, data: ImageData, experiment_id: str, parent_run_id: str,
                 on_epoch: EpochCallback | None = None) -> None:
        self.base, self.space, self.data = base, space, data
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.on_epoch = on_epoch  # progress inside a trial

    def __call__(self, trial: optuna.Trial) -> float:
        beat_now(trial)
        ddp.tell(ddp.TRIAL, self.base.to_dict())  # under --nproc, the other ranks train this trial with us
        shared = ddp.shared_trial(trial)
        cfg = self.space.config(self.base, self.space.suggest(shared))
        trial.set_user_attr("config", cfg.to_dict())
        trial.set_user_attr("worker", worker_id())
        run = mlflow.start_run(
            experiment_id=self.experiment_id, run_name=f"trial-{trial.number}", parent_run_id=self.parent_run_id,
            tags={"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number), "kind": "trial"},
        )
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        state, t0 = "failed", time.perf_counter()
        try:
            device = select_device(cfg.device)
            mlflow.log_params(flat_params(cfg))
            mlflow.set_tags(run_tags(cfg, self.data, str(device), resolve_precision(cfg.precision, device)))
            value = self._train(trial, shared, cfg)
            state = "complete"
            return value
        except optuna.TrialPruned as e:
            state = "pruned"
            mlflow.set_tag("prune_reason", str(e))
            raise
        except DivergedError as e:
            raise self._failed(trial, "diverged", e) from e
        except Exception as e:
            if is_out_of_memory(e):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise self._failed(trial, "out of memory", e) from e
            if not tracking_gone(e):  # a server gone for good is not asked again
                mlflow.set_tag("fail_reason", f"{type(e).__name__}: {e}"[:5000])
            raise
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the run ends KILLED with the reason
            state = "killed"
            mlflow.set_tag("end_reason", end_reason(e))
            raise
        finally:
            end_trial_run(state, time.perf_counter() - t0, failing=state != "complete")

    def _train(self, trial: optuna.Trial, shared: Any, cfg: TrainConfig) -> float:
        callbacks = [epoch_logger, *([self.on_epoch] if self.on_epoch else []), pruning_callback(shared)]
        result = fit(cfg, self.data, callbacks)
        log_fit(result, self.data, log_model_=False)  # curves, history, summary metrics
        save_weights(result.model)
        value = result.val.accuracy
        trial.set_user_attr("train_seconds", result.train_seconds)
        return value

    @staticmethod
    def _failed(trial: optuna.Trial, kind: str, e: BaseException) -> TrialFailed:
        reason = f"{kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        trial.set_user_attr("fail_reason", reason)
        mlflow.set_tag("fail_reason", reason)
        return TrialFailed(reason)


def end_trial_run(state: str, seconds: float, failing: bool) -> None:
    """Close the trial's MLflow run. When the trial is already failing (or pruned, or interrupted), a failure
    here (the server is gone) is a warning: the trial's own error is the one the user sees."""
    try:
        mlflow.log_metric("trial_seconds", seconds)
        mlflow.set_tag("state", state)
        mlflow.end_run(MLFLOW_STATUS.get(state, "KILLED"))
    except Exception as e:
        if not failing:
            raise
        gone = tracking_gone(e)
        if mlflow.active_run():
            with contextlib.suppress(Exception):  # pops the run even when the server does not answer
                mlflow.end_run(MLFLOW_STATUS.get(state, "KILLED"))
        if not gone:  # a lost server is what the trial's own error says already
            warnings.warn(f"could not close the trial's MLflow run ({first_line(e)})", ReslabWarning, stacklevel=2)


def save_weights(model: torch.nn.Module) -> None:
    """Keep the trial's final weights (safetensors, a few MB) so any worker can register it later."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(str(store_weights(model, Path(tmp) / "weights.safetensors")), WEIGHTS_ARTIFACT)
