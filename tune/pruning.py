"""The epoch callback through which a trial reports validation accuracy and the pruner stops it.

Shared by the tuning worker (tune/objective.py) and the other DDP ranks (tune/ddp.py), which must
stop at the same epoch.
"""

from __future__ import annotations

from typing import Any

import optuna

from train.engine import EpochCallback


def pruning_callback(trial: Any) -> EpochCallback:
    """Engine callback: report val_acc per epoch; raise TrialPruned when the pruner says so (on every
    rank at once under --nproc, where ``trial`` is a TorchDistributedTrial)."""

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if "val_acc" not in metrics:
            return
        trial.report(metrics["val_acc"], step=epoch + 1)
        if trial.should_prune():
            raise optuna.TrialPruned(f"val_acc {metrics['val_acc']:.4f} after epoch {epoch + 1} is below the pruner's bar")

    return report
