"""The shared trial budget under contention: several worker processes on one journal-file study,
with an objective so short that they ask for trials at nearly the same moments. A "finished +
running < budget" check before each ask overshot here (7 trials for a budget of 6 in CI); taking
queued slots must give exactly the budget, each trial once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from tune.slots import SLOT_ATTR, SlotStudy

WORKER = textwrap.dedent("""
    import contextlib, sys, time
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from tune.slots import BudgetSpent, SlotStudy

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = SlotStudy("s", JournalStorage(JournalFileBackend(sys.argv[1])), optuna.samplers.RandomSampler(),
                      optuna.pruners.NopPruner(), int(sys.argv[2]))
    print("waiting", flush=True)
    assert study.wait_for_slots(60)
    ran = 0
    def objective(trial):
        global ran
        ran += 1
        time.sleep(0.002)
        return trial.suggest_float("x", 0, 1)
    with contextlib.suppress(BudgetSpent):  # how a worker stops: no slot left
        study.optimize(objective)
    print(ran)
""")


def _study(path: Path, invocation: int) -> SlotStudy:
    storage = JournalStorage(JournalFileBackend(str(path)))
    optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
    return SlotStudy("s", storage, optuna.samplers.RandomSampler(), optuna.pruners.NopPruner(), invocation)


def _workers(path: Path, invocation: int, n: int, go=lambda: None) -> list[int]:
    """Start ``n`` workers; once all of them wait for the invocation's slots, ``go()`` (which may queue
    them), so that they start taking trials within one poll (0.2 s) of each other."""
    logs = [path.parent / f"worker-{invocation}-{i}.err" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(invocation)], stdout=subprocess.PIPE,
                              stderr=log.open("w"), text=True, cwd=Path(__file__).parents[1]) for log in logs]
    for p, log in zip(procs, logs):
        assert p.stdout.readline().strip() == "waiting", log.read_text()[-2000:]
    go()
    # the rest of stdout through the same buffered reader that read the first line (communicate() would
    # bypass it and lose whatever it had already buffered)
    out = [p.stdout.read() for p in procs]
    for p, log in zip(procs, logs):
        assert p.wait(120) == 0, log.read_text()[-2000:]
    return [int(o.split()[-1]) for o in out]


def test_workers_racing_for_trials_meet_the_budget_exactly(tmp_path):
    path = tmp_path / "journal.log"
    study = _study(path, 1)
    ran = _workers(path, 1, 3, go=lambda: study.provide(40))
    trials = study.get_trials(deepcopy=False)
    assert sum(ran) == 40 and sum(r > 0 for r in ran) >= 2, ran  # the workers really shared the budget
    assert sorted(t.number for t in trials) == list(range(40))  # no trial beyond the budget
    assert all(t.state == TrialState.COMPLETE and t.user_attrs[SLOT_ATTR] == 1 for t in trials)
    assert len({t.params["x"] for t in trials}) == 40  # every trial sampled its own parameters


def test_a_later_invocation_adopts_queued_trials_and_runs_only_its_budget(tmp_path):
    path = tmp_path / "journal.log"
    first = _study(path, 1)
    first.provide(5)
    first.enqueue_trial({"x": 0.25})  # queued by hand, outside any invocation
    ran = _workers(path, 1, 1)
    assert ran == [5]  # invocation 1 takes its own five and leaves the hand-queued trial
    second = _study(path, 2)
    assert second.provide(3) == 1  # the hand-queued trial is adopted as one of invocation 2's three
    assert sum(_workers(path, 2, 2)) == 3
    trials = second.get_trials(deepcopy=False)
    assert len(trials) == 8, [(t.number, t.state) for t in trials]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.user_attrs[SLOT_ATTR] for t in trials] == [1] * 5 + [2] * 3 and trials[5].params["x"] == 0.25


def test_optuna_contract(tmp_path):
    """What tune/slots.py relies on beyond Optuna's public API; fails loudly when an upgrade changes it.
    (1) ``Study.optimize`` takes its trials through ``study.ask()``: with no slot queued, the study
    starts no trial and ``optimize`` ends with BudgetSpent. (2) The per-thread trial cache that ``ask``
    clears exists where it is cleared. (3) The installed Optuna is the minor version pinned."""
    import importlib.metadata

    from tune.slots import BudgetSpent

    study = _study(tmp_path / "journal.log", 1)
    with pytest.raises(BudgetSpent):
        study.optimize(lambda trial: 0.0, n_trials=3)
    assert study.get_trials(deepcopy=False) == []  # optimize never created a trial of its own
    assert hasattr(study._thread_local, "cached_all_trials")
    study.provide(2)
    with pytest.raises(BudgetSpent):
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1))
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * 2
    version = importlib.metadata.version("optuna")
    assert version.startswith("5.1."), f"tune/slots.py was checked against Optuna 5.1, not {version}"


def test_a_trial_has_its_heartbeat_before_the_objective_works(tmp_path):
    """A worker killed before Optuna's heartbeat thread first ran left a RUNNING trial with no heartbeat,
    which the stale rule skips for ever; the objective writes one itself, first thing."""
    from tune.objective import beat_now
    from tune.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=60)
    optuna.create_study(study_name="s", storage=storage)
    study = SlotStudy("s", storage, optuna.samplers.RandomSampler(), optuna.pruners.NopPruner(), 1)
    trial_id = storage.create_new_trial(study.slot_study_id)  # RUNNING, as ask() leaves it, and no heartbeat yet
    trial = optuna.Trial(study, trial_id)
    watcher = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=1)  # stale after 2 s without a beat
    beat_now(trial)
    deadline = time.monotonic() + 30
    while trial_id not in watcher._get_stale_trial_ids(study.slot_study_id):  # the beat counts, and then ages
        assert time.monotonic() < deadline, "the trial's heartbeat never aged: beat_now wrote none"
        time.sleep(0.5)
