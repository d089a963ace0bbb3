"""The epoch callback through which a trial reports validation accuracy and the pruner stops it.

Shared by the tuning worker (tune/objective.py) and the other DDP ranks (tune/ddp.py), which must
stop at the same epoch.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.pruners import BasePruner

from train.engine import EpochCallback

from .slots import SLOT_ATTR


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


class OwnInvocation(BasePruner):
    """Prune a trial against the trials of its own invocation only. Each ``--budget`` invocation sizes its trials
    for its own machine and minutes (subset, epochs: tune/budget.py), so a resumed study's new trials at epoch 1
    were judged against an earlier invocation's epoch 1, which may have trained on another number of images."""

    def __init__(self, pruner: BasePruner) -> None:
        self.pruner = pruner

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return self.pruner.prune(InvocationView(study, trial.user_attrs.get(SLOT_ATTR)), trial)


class InvocationView:
    """The study as its pruner reads it, through ``get_trials``, with only one invocation's trials (the slots
    it queued, tune/slots.py); everything else is the study's own. tests/test_tune.py checks that
    Optuna's pruners still read their peers this way."""

    def __init__(self, study: optuna.Study, invocation: int | None) -> None:
        self._study, self._invocation = study, invocation

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if t.user_attrs.get(SLOT_ATTR) == self._invocation]
