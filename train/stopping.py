"""Early stopping and the best epoch's weights (``--patience``, ``--restore-best``).

The tracker follows validation accuracy epoch by epoch. It keeps the best epoch's weights as a CPU copy of
the state dict (a few MB for these networks: cheaper and simpler than a file per epoch) and its whole state
goes into the checkpoint, so a resumed run stops at, and restores, the epoch an uninterrupted run would.
Under DDP every rank feeds it the same validation accuracy (``evaluate`` gathers the full result on all
ranks), so all ranks stop at the same epoch without another collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import TrainConfig


def check(cfg: TrainConfig) -> None:
    """Bad values as one-line ValueErrors (the CLI shows them as ``reslab: error:``): early stopping and the
    best epoch both judge validation accuracy, so they need a validation split."""
    p = cfg.patience
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
        raise ValueError(f"--patience must be a whole number of epochs, at least 1 (got {p!r})")
    for flag, on in (("--patience", p is not None), ("--restore-best", cfg.restore_best)):
        if on and not cfg.val_fraction > 0:
            raise ValueError(f"{flag} judges validation accuracy, so it needs a validation split "
                             f"(--val-fraction above 0, got {cfg.val_fraction})")


@dataclass
class BestEpoch:
    """The best validation accuracy so far, its epoch (1-based, 0: none yet), its weights (when
    ``keep_weights``), the epochs since it, and the epoch the run stopped at (0: it did not)."""

    patience: int | None = None
    keep_weights: bool = False
    best_acc: float = float("-inf")
    best_epoch: int = 0
    since_best: int = 0
    stopped_epoch: int = 0
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch > 0

    def update(self, epoch: int, val_acc: float, model: nn.Module | None) -> bool:
        """Record epoch ``epoch``'s accuracy of ``model`` (the evaluated one: the EMA when there is one; None
        when replaying a history whose weights are gone); True when the run should stop here. Only a strictly
        higher accuracy counts as an improvement, so a plateau runs out the patience and keeps its first epoch."""
        if val_acc > self.best_acc:  # NaN (no validation images) never improves
            self.best_acc, self.best_epoch, self.since_best = val_acc, epoch, 0
            keep = self.keep_weights and model is not None  # a copy: state_dict() tensors alias the live weights
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if keep else None
        else:
            self.since_best += 1
        if self.patience is not None and self.since_best >= self.patience:
            self.stopped_epoch = epoch
        return self.stopped

    def restore(self, model: nn.Module) -> bool:
        """Load the best epoch's weights into ``model``; False when none were kept."""
        if self.weights is None:
            return False
        model.load_state_dict(self.weights)
        return True

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint (plain types and tensors: it loads with ``weights_only=True``)."""
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "since_best": self.since_best,
                "stopped_epoch": self.stopped_epoch, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]
        self.since_best, self.stopped_epoch = state["since_best"], state["stopped_epoch"]
        self.weights = state["weights"] if self.keep_weights else None

    def summary(self, last_epoch: int, restored: bool) -> dict[str, float]:
        """What the run logs: the best epoch and its accuracy, the epoch whose weights were kept
        (``model_epoch``) and, when patience ended it, ``stopped_epoch``."""
        out = {"model_epoch": float(self.best_epoch if restored else last_epoch)}
        if self.best_epoch:  # there was a validation split
            out.update(best_epoch=float(self.best_epoch), best_val_acc=float(self.best_acc))
        if self.stopped:
            out["stopped_epoch"] = float(self.stopped_epoch)
        return out
