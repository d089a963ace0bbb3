"""An invocation's trial budget as queued (WAITING) trials, one per trial it may run: its *slots*.

Why: ``study.optimize`` creates a new trial whenever none is queued, so workers that check a shared
"finished + running < budget" count before asking can all pass the check at once and overshoot the
budget (seen with 3 workers and a budget of 6: 7 trials). Taking a queued trial is the one atomic
step Optuna's storages offer (WAITING -> RUNNING succeeds for exactly one caller), so when every
trial of the invocation is made up front and workers only take, no worker can start a trial beyond
the budget. A trial whose worker died is queued again by the heartbeat/reaper with its user
attributes, so its retry stays in the invocation's slots.
"""

from __future__ import annotations

import time
from typing import Any

import optuna
from optuna.trial import TrialState

SLOT_ATTR = "invocation"  # trial user attribute: the number of the invocation the slot belongs to


class BudgetSpent(Exception):
    """No slot left for this worker: the invocation's budget is taken (raised out of ``optimize``)."""


class SlotStudy(optuna.Study):
    """A study whose ``ask`` takes one of the invocation's slots and never creates a trial."""

    def __init__(self, study_name: str, storage: Any, sampler: Any, pruner: Any, invocation: int) -> None:
        super().__init__(study_name, storage, sampler=sampler, pruner=pruner)
        self.invocation = invocation

    def ask(self, fixed_distributions: dict[str, Any] | None = None) -> optuna.Trial:
        self._thread_local.cached_all_trials = None  # as Optuna's ask: see the other workers' trials
        for t in self.waiting():
            if t.user_attrs.get(SLOT_ATTR) != self.invocation:
                continue
            try:
                if self._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    return self._trial(t._trial_id, fixed_distributions)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker took it and already finished it
        raise BudgetSpent

    def _trial(self, trial_id: int, fixed_distributions: dict[str, Any] | None) -> optuna.Trial:
        trial = optuna.Trial(self, trial_id)
        for name, dist in (fixed_distributions or {}).items():
            trial._suggest(name, dist)
        return trial

    def waiting(self) -> list[optuna.trial.FrozenTrial]:
        return self.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    def provide(self, budget: int, first: dict[str, Any] | None = None) -> int:
        """Make this invocation's slots (by its creator only): trials still queued from an earlier
        invocation (cut short, or enqueued by hand) are adopted first, then new ones are queued, the
        first of them with the parameters ``first`` when given."""
        adopted = self.waiting()[:budget]
        for t in adopted:
            self._storage.set_trial_user_attr(t._trial_id, SLOT_ATTR, self.invocation)
        for i in range(budget - len(adopted)):
            self.enqueue_trial(first if i == 0 and first else {}, user_attrs={SLOT_ATTR: self.invocation})
        self.set_user_attr(ready_key(self.invocation), budget)
        return len(adopted)

    def wait_for_slots(self, timeout: float = 60.0) -> bool:
        """A worker that joins an invocation waits until its creator has queued all its slots."""
        deadline = time.monotonic() + timeout
        while ready_key(self.invocation) not in self.user_attrs:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


def ready_key(invocation: int) -> str:
    return f"slots:{invocation}"
