"""What a user watches: one line per finished trial, and a bar over the study's budget (trials, or
wall-clock seconds for ``--budget``) with the phase, the trial in flight and the time left."""

from __future__ import annotations

import time

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from train.budget import format_duration

from .budget import BudgetPlan
from .parent import Invocation


def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def trial_line(study: optuna.Study, trial: FrozenTrial) -> str:
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(trial.state, trial.state.name.lower())
    value = f"val_acc {trial.value:.4f}" if trial.value is not None else (
        f"val_acc {list(trial.intermediate_values.values())[-1]:.4f} at epoch {max(trial.intermediate_values)}"
        if trial.intermediate_values else "no value")
    reason = f" ({trial.user_attrs['fail_reason']})" if "fail_reason" in trial.user_attrs else ""
    seconds = f" {trial.duration.total_seconds():.0f}s" if trial.duration else ""
    try:
        best = f"best {study.best_value:.4f} (#{study.best_trial.number})"
    except ValueError:
        best = "best -"
    return f"trial {trial.number:>3} {state:<8} {value}{reason} | {params} |{seconds} | {best}"


class StudyProgress:
    """Optuna callback (a line per trial) and engine epoch callback (progress inside a trial). The bar
    counts the invocation's finished trials over all workers, or, with a budget plan, the seconds
    spent of the budget, so that what it says is left is the time the run has left."""

    def __init__(self, inv: Invocation, study: optuna.Study, enabled: bool = True, plan: BudgetPlan | None = None,
                 trial_epochs: int = 0) -> None:
        self.inv, self.plan, self.trial_epochs = inv, plan, trial_epochs
        self.trial_started = time.time()
        if plan:
            fmt = "{desc} |{bar}| {postfix}"
            self.bar = tqdm(total=int(plan.seconds), desc="[search]", bar_format=fmt, disable=not enabled,
                            dynamic_ncols=True, mininterval=1.0)
        else:
            self.bar = tqdm(total=inv.target - inv.finished_before, desc=f"study {study.study_name}", unit="trial",
                            initial=inv.finished(study), disable=not enabled, dynamic_ncols=True)
        self._tick("trial starting")

    def _tick(self, what: str, best: str = "") -> None:
        if not self.plan:
            return
        now = time.time()
        spent = now - (self.plan.deadline - self.plan.seconds)
        self.bar.n = int(min(self.plan.seconds, max(0.0, spent)))
        self.bar.set_postfix_str(f"{what}{best} | {format_duration(spent)} spent, ~{format_duration(self.plan.deadline - now)} "
                                 f"of the budget left (search ends in ~{format_duration(self.plan.search_timeout(now))})")

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Inside a trial, after each epoch."""
        acc = f" val_acc {metrics['val_acc']:.3f}" if "val_acc" in metrics else ""
        self._tick(f"trial epoch {epoch + 1}/{self.trial_epochs}{acc}")
        if not self.plan:
            self.bar.set_postfix_str(f"trial epoch {epoch + 1}/{self.trial_epochs}{acc}")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        tqdm.write(trial_line(study, trial))
        try:
            best = f", best {study.best_value:.4f}"
        except ValueError:
            best = ""
        if self.plan:
            self._tick(f"{self.inv.finished(study)} trials", best)
            return
        self.bar.n = min(self.bar.total, self.inv.finished(study))
        if best:
            self.bar.set_postfix(best=f"{study.best_value:.4f}")
        else:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
