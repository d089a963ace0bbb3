"""What a user watches: a bar over the study's budget and one line per finished trial."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

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
    """Optuna callback: print the trial's line and move the bar to the invocation's finished count
    (all workers), so the bar shows the shared budget."""

    def __init__(self, inv: Invocation, study: optuna.Study, enabled: bool = True) -> None:
        self.inv = inv
        self.bar = tqdm(total=inv.target - inv.finished_before, desc=f"study {study.study_name}", unit="trial",
                        initial=inv.finished(study), disable=not enabled, dynamic_ncols=True)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        tqdm.write(trial_line(study, trial))
        self.bar.n = min(self.bar.total, self.inv.finished(study))
        try:
            self.bar.set_postfix(best=f"{study.best_value:.4f}")
        except ValueError:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
