"""DDP trials (``reslab tune --nproc N``): every trial trains on N processes started by torchrun.

Rank 0 is the tuning worker: it alone talks to the Optuna storage and to MLflow. The other ranks
only train. Before each collective job rank 0 says what comes next (a trial, the refit of the best
configuration, or stop); a trial's sampled parameters and its per-epoch pruning decision reach the
other ranks through optuna-integration's ``TorchDistributedTrial``, so every rank trains the same
configuration and stops at the same epoch. Without torchrun every function here is a no-op.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
import torch.distributed as dist

from train import distributed
from train.config import TrainConfig
from train.data import ImageData
from train.engine import DivergedError, fit, select_device

from .pruning import pruning_callback
from .space import SearchSpace

TRIAL, REFIT, STOP = "trial", "refit", "stop"


def enabled() -> bool:
    """True inside a torchrun worker group of more than one process."""
    return distributed.env_context().enabled


def join(device: str) -> None:
    """Join torchrun's process group before the first message (fit would join it later anyway)."""
    if enabled():
        distributed.context(select_device(device))


def tell(kind: str, payload: Any = None) -> None:
    """Rank 0: announce the next collective job to the other ranks."""
    if enabled():
        dist.broadcast_object_list([(kind, payload)], src=0)


def _listen() -> tuple[str, Any]:
    message: list[Any] = [None]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def shared_trial(trial: optuna.Trial | None) -> Any:
    """The trial as every rank sees it: rank 0's real trial, mirrored to the others (``None`` there)."""
    if not enabled():
        return trial
    from optuna_integration import TorchDistributedTrial

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return TorchDistributedTrial(trial)


def follow(base: TrainConfig, space: SearchSpace, data: ImageData) -> int:
    """Ranks > 0: train whatever rank 0 announces until it says stop; returns the trials trained."""
    trials = 0
    while True:
        kind, payload = _listen()
        if kind == STOP:
            return trials
        if kind == REFIT:
            fit(TrainConfig.from_dict(payload), data)
            continue
        trial = shared_trial(None)
        cfg = space.config(TrainConfig.from_dict(payload) if payload else base, space.suggest(trial))
        trials += 1
        try:
            fit(cfg, data, [pruning_callback(trial)])
        except (optuna.TrialPruned, DivergedError):  # rank 0 records the outcome
            pass
