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
RECIPE_ATTR = "recipe"  # trial user attribute: the slot queued with the base configuration's own values


class BudgetSpent(Exception):
    """No slot left for this worker: the invocation's budget is taken (raised out of ``optimize``)."""


class SlotStudy(optuna.Study):
    """A study whose ``ask`` takes one of the invocation's slots and never creates a trial.

    Every storage call goes through the storage's public interface (``BaseStorage``), on the storage
    object this study was given. Two uses of Optuna internals remain, both checked by
    ``tests/test_slots.py::test_optuna_contract`` so that an Optuna upgrade fails loudly there, and
    Optuna is pinned to its minor version in pyproject.toml:
    - ``Study.optimize`` takes its trials through ``self.ask()`` (overridden here);
    - ``ask`` clears the per-thread trial cache (``_thread_local.cached_all_trials``) as Optuna's own
      ``ask`` does, so the sampler sees the trials other workers finished meanwhile.
    """

    def __init__(self, study_name: str, storage: Any, sampler: Any, pruner: Any, invocation: int) -> None:
        super().__init__(study_name, storage, sampler=sampler, pruner=pruner)
        self.invocation = invocation
        self.slot_storage = storage  # the object given: its public methods only
        self.slot_study_id = storage.get_study_id_from_name(study_name)

    def ask(self, fixed_distributions: dict[str, Any] | None = None) -> optuna.Trial:
        if fixed_distributions:
            raise NotImplementedError("a slot trial takes its parameters from the sampler or its queue entry")
        self._thread_local.cached_all_trials = None  # (internal, see above) see the other workers' trials
        for t in self.waiting():
            if t.user_attrs.get(SLOT_ATTR) != self.invocation:
                continue
            trial_id = self._trial_id(t)
            try:
                if self.slot_storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return optuna.Trial(self, trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker took it and already finished it
        raise BudgetSpent

    def _trial_id(self, t: optuna.trial.FrozenTrial) -> int:
        return self.slot_storage.get_trial_id_from_study_id_trial_number(self.slot_study_id, t.number)

    def waiting(self) -> list[optuna.trial.FrozenTrial]:
        return self.slot_storage.get_all_trials(self.slot_study_id, deepcopy=False, states=(TrialState.WAITING,))

    def provide(self, budget: int, first: dict[str, Any] | None = None, pinned: dict[str, Any] | None = None) -> int:
        """Make this invocation's slots (by its creator only): trials still queued from an earlier
        invocation (cut short, or enqueued by hand) are adopted first, then new ones are queued, the
        first of them with the parameters ``first`` when given, every one with ``pinned``."""
        adopted = self.waiting()[:budget]
        for t in adopted:
            self.slot_storage.set_trial_user_attr(self._trial_id(t), SLOT_ATTR, self.invocation)
        for i in range(budget - len(adopted)):
            recipe = i == 0 and bool(first)
            params = {**(first if recipe else {}), **(pinned or {})}
            self.enqueue_trial(params, user_attrs={SLOT_ATTR: self.invocation, **({RECIPE_ATTR: True} if recipe else {})})
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
