"""``reslab tune`` paths beyond the main study of test_tune.py, each proven on a real CIFAR-10 subset
with a real MLflow store, real Optuna storages and, where the feature is about processes, real
``reslab`` processes: the hyperband pruner, ``--timeout``, ``--init-from``, the journal reaper after
``kill -9`` of the only worker, an SQLite study storage, an out-of-memory trial, and registration
once when a study resumes without ``--refit``."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import module_store
from test_tune import COMMON, tiny_cifar  # noqa: F401 (tiny_cifar is a fixture: 600 train / 200 test images)
from train.cli import main

RESLAB = [str(Path(sys.executable).parent / "reslab")]  # the installed console script
GOOD = {"lr": 0.05, "batch_size": 32, "weight_decay": 5e-4}  # learns in one epoch (test_tune.py)
SLOW = {"lr": 1e-5, "batch_size": 128, "weight_decay": 5e-4}  # barely moves: ~chance after one epoch


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_cifar):  # noqa: F811
    """One embedded store (MLflow SQLite + the default Optuna journal) for this module's studies."""
    from train.tracking import setup_tracking

    tmp = tmp_path_factory.mktemp("tune-paths")
    with module_store(tmp, RESLAB_CACHE=str(tmp / "cache")):
        setup_tracking()
        yield {"root": tmp, "journal": tmp / "mlruns" / "optuna" / "journal.log", "data": str(tiny_cifar)}


def storage_of(url_or_log: str | Path) -> optuna.storages.BaseStorage:
    from tune.storage import open_storage

    return open_storage(str(url_or_log))


def study_of(store, name: str, storage: str | Path | None = None) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=storage_of(storage or store["journal"]), direction="maximize",
                               load_if_exists=True)


def parent_runs(study: str) -> list[mlflow.entities.Run]:
    return MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("cifar10").experiment_id],
        f"tags.kind = 'study' and tags.`optuna.study` = '{study}'", order_by=["attributes.start_time ASC"])


def versions_of(study: str) -> list:
    return [v for v in MlflowClient().search_model_versions("name='cifar10-resnet'") if v.tags.get("study") == study]


def trial_weights(trial: optuna.trial.FrozenTrial) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tune.objective import WEIGHTS_ARTIFACT

    local = mlflow.artifacts.download_artifacts(run_id=trial.user_attrs["mlflow_run_id"], artifact_path=WEIGHTS_ARTIFACT)
    return load_file(str(Path(local) / "weights.safetensors"))


# --------------------------------------------------------------------------- hyperband on SQLite, resumed


@pytest.fixture(scope="module")
def sqlite_url(store) -> str:
    return f"sqlite:///{store['root'] / 'optuna.db'}"


@pytest.fixture(scope="module")
def hyperband_study(store, sqlite_url):
    """On an SQLite study storage: a sound trial, then a slow one. Hyperband (one bracket at 1 epoch:
    successive halving with its rung at epoch 1) keeps the best third of a rung, so the slow trial is
    pruned at its rung; the default median pruner would not prune here (it waits for 3 complete
    trials). The best trial is registered: cifar10-resnet version 1."""
    study = study_of(store, "hb", sqlite_url)
    study.enqueue_trial(GOOD)
    study.enqueue_trial(SLOW)
    main(["tune", "--data", store["data"], "--study", "hb", "--storage", sqlite_url, "--trials", "2",
          "--pruner", "hyperband", *COMMON])
    return study_of(store, "hb", sqlite_url)


@pytest.fixture(scope="module")
def hyperband_resumed(hyperband_study, store, sqlite_url):
    """The same study resumed for one more (slow, queued) trial, without --refit; returns its output."""
    study_of(store, "hb", sqlite_url).enqueue_trial(SLOW)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["tune", "--data", store["data"], "--study", "hb", "--storage", sqlite_url, "--trials", "1",
              "--pruner", "hyperband", *COMMON])
    print(out.getvalue())
    return out.getvalue()


def test_hyperband_prunes_at_its_rungs(hyperband_study):
    good, slow = hyperband_study.get_trials()
    assert (good.state, slow.state) == (TrialState.COMPLETE, TrialState.PRUNED), [
        (t.state, t.intermediate_values) for t in (good, slow)]
    # hyperband's successive-halving bookkeeping: each trial's value at rung 0 (epoch 1); a median or
    # no-op pruner writes none
    assert good.system_attrs["completed_rung_0"] == pytest.approx(good.intermediate_values[1])
    assert slow.system_attrs["completed_rung_0"] == pytest.approx(slow.intermediate_values[1])
    assert slow.intermediate_values[1] < good.intermediate_values[1]
    (parent,) = parent_runs("hb")
    assert parent.info.status == "FINISHED" and parent.data.params["pruner"] == "hyperband"
    assert (parent.data.metrics["trials_complete"], parent.data.metrics["trials_pruned"]) == (1, 1)


def test_sqlite_study_storage_runs_and_resumes(hyperband_study, hyperband_resumed, sqlite_url, store):
    """Both invocations ran on the SQLite file: one study, trials numbered on, two finished parents."""
    study = optuna.load_study(study_name="hb", storage=sqlite_url)
    assert study._study_id == hyperband_study._study_id
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state.is_finished() for t in study.trials), [t.state for t in study.trials]
    assert [t.user_attrs["invocation"] for t in study.trials] == [1, 1, 2]  # each trial in its invocation's slots
    assert study.user_attrs["invocation"]["number"] == 2
    first, second = parent_runs("hb")
    assert [p.info.status for p in (first, second)] == ["FINISHED", "FINISHED"]
    assert first.data.params["storage"] == second.data.params["storage"] == sqlite_url
    assert second.data.metrics["trials_this_invocation"] == 1
    assert "hb" not in optuna.get_all_study_names(storage_of(store["journal"]))  # not in the default journal


def test_resume_without_refit_registers_once(hyperband_study, hyperband_resumed):
    """The resumed study's best trial is still trial 0, already version 1: no second version."""
    study = optuna.load_study(study_name="hb", storage=hyperband_study._storage)
    assert [(str(v.version), v.tags["trial"]) for v in versions_of("hb")] == [("1", "0")]
    assert study.user_attrs["registered_versions"] == {"0": "1"}
    assert study.best_trial.number == 0 and study.trials[2].intermediate_values[1] < study.best_value  # precondition: best unchanged
    assert "best trial 0 is already version 1 of cifar10-resnet: nothing new to register" in hyperband_resumed
    first, second = parent_runs("hb")
    assert first.data.tags["registered.version"] == "1"
    assert "registered.version" not in second.data.tags  # the resumed invocation registered nothing


# --------------------------------------------------------------------------- --init-from


def test_init_from_starts_trials_from_the_registered_weights(hyperband_study, store, tmp_path):
    """A trial at a learning rate of 1e-9 (no weight decay) keeps the weights it started from: with
    --init-from they are version 1's, which differ from a fresh initialisation."""
    from safetensors.torch import load_file

    from train.models import create_model
    from train.tracking import model_files

    space = tmp_path / "space.yaml"
    space.write_text("lr: 1.0e-9\nbatch_size: 32\nweight_decay: 0.0\n")
    main(["tune", "--data", store["data"], "--study", "init", "--trials", "1", "--pruner", "none", "--no-register",
          "--subset", "100", "--space", str(space), "--init-from", "models:/cifar10-resnet/1", *COMMON])
    (trial,) = study_of(store, "init").trials
    assert trial.state == TrialState.COMPLETE
    started = trial_weights(trial)
    registered = load_file(str(model_files("models:/cifar10-resnet/1")[1]))
    torch.manual_seed(0)
    fresh = create_model("resnet20", 10, 3).state_dict()
    learned = [k for k, v in registered.items() if v.ndim > 1]  # conv and linear weights (BN statistics move)
    assert len(learned) >= 20 and set(learned) <= set(started)
    for k in learned:
        assert torch.allclose(started[k], registered[k], atol=1e-6), k
    assert max((registered[k] - fresh[k]).abs().max().item() for k in learned) > 1e-3  # version 1 was trained
    run = MlflowClient().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.params["pretrained"].endswith("weights.safetensors")


# --------------------------------------------------------------------------- --timeout


def test_timeout_stops_starting_trials(store):
    """A budget of 8 trials and a 5 s timeout: the trial running at the deadline finishes, no trial
    starts after it, the unused slots stay queued and the parent run ends FINISHED."""
    main(["tune", "--data", store["data"], "--study", "to", "--trials", "8", "--timeout", "5s", "--pruner", "none",
          "--no-register", *COMMON])
    study = study_of(store, "to")
    done = [t for t in study.trials if t.state.is_finished()]
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert 1 <= len(done) < 8 and len(done) + len(waiting) == 8, [t.state for t in study.trials]
    assert all(t.state == TrialState.COMPLETE for t in done)
    deadline = study.user_attrs["invocation"]["started"] + 5
    assert all(t.datetime_start.timestamp() <= deadline + 1 for t in done), (deadline, [t.datetime_start for t in done])
    (parent,) = parent_runs("to")
    # it stopped for the time, not the budget: slots were left, and the study ended after the deadline
    # (Optuna checks the clock between trials, so the last trial itself may end just before it)
    assert parent.info.end_time / 1000 >= deadline, (parent.info.end_time / 1000, deadline)
    assert parent.info.status == "FINISHED" and parent.data.params["timeout"] == "5.0"
    assert parent.data.metrics["trials_this_invocation"] == len(done)
    children = MlflowClient().search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.status for r in children) == ["FINISHED"] * len(done)


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (RuntimeError("the refit broke"), "FAILED")])
def test_a_study_stopped_while_it_registers_ends_its_parent_and_the_same_command_finishes_it(store, error, status):
    """Ctrl-C (or an error) in the final refit, test or registration used to leave the invocation's parent
    run RUNNING with its finalisation already claimed: the same command then joined that dead invocation,
    found nothing left to do, exited 0 and registered nothing, every time. Now the parent ends (KILLED or
    FAILED) and the same command runs the study's next invocation through to a registered model."""
    import tune.study

    name = f"stopped-{status.lower()}"
    args = ["tune", "--data", store["data"], "--study", name, "--trials", "1", "--pruner", "none", *COMMON]

    def stopped(*_args, **_kwargs):
        raise error

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune.study, "register_best", stopped)
        with pytest.raises(SystemExit if error is KeyboardInterrupt else RuntimeError):
            main(args)
    (first,) = parent_runs(name)
    assert first.info.status == status and not versions_of(name)
    main(args)
    first, second = parent_runs(name)
    assert first.info.status == status and (second.info.status, second.data.tags["invocation"]) == ("FINISHED", "2")
    (version,) = versions_of(name)
    assert second.data.tags["registered.version"] == str(version.version)


def test_a_refit_trains_as_long_as_its_command_says_whichever_invocation_the_best_trial_came_from(store, capsys, tmp_path):
    """The best trial can come from an earlier, shorter invocation (a --budget search trains on a subset for a
    few epochs). A later plain --refit used to retrain that trial's own length, a low-fidelity model it then
    tested and registered; it now trains the best configuration as long as its own command's trials do (here
    the length its --space file fixes, over the --epochs flag)."""
    study = study_of(store, "lengths")
    study.enqueue_trial(GOOD)
    main(["tune", "--data", store["data"], "--study", "lengths", "--trials", "1", "--subset", "500", "--pruner", "none",
          "--no-register", *COMMON])
    study.enqueue_trial(SLOW)  # this invocation's one trial loses: the best is still the short one
    space = tmp_path / "space.yaml"
    space.write_text("epochs: 2\n")  # fixed, not searched: never among a trial's params
    main(["tune", "--data", store["data"], "--study", "lengths", "--trials", "1", "--pruner", "none", "--refit",
          "--space", str(space), *COMMON])
    out = capsys.readouterr().out
    best, slow = study_of(store, "lengths").trials
    assert best.value > slow.value and best.user_attrs["config"]["subset"] == 500, (best.value, slow.value)
    (version,) = versions_of("lengths")
    refit = MlflowClient().get_run(version.run_id)
    assert refit.data.tags["kind"] == "refit" and refit.data.tags["optuna.trial"] == "0"
    assert (refit.data.params["subset"], refit.data.params["epochs"]) == ("None", "2"), refit.data.params
    assert "[refit] trial 0's configuration on train+val (600 images, 2 epochs)" in out, out
    assert refit.data.params["lr"] == str(best.user_attrs["config"]["lr"])  # the searched values are the trial's own


def test_studies_finishing_together_leave_the_best_version_champion(store):
    """MLflow sets an alias unconditionally: two studies that read the champion before either moved it each
    took it, and the last to write won, the worse one included. Here four versions are promoted at once, the
    worse a version the later it writes (so without the local store's lock the worst ended up champion)."""
    import threading

    from train.tracking import promote

    client, name = MlflowClient(), "race-resnet"
    client.create_registered_model(name)
    accs = [0.6, 0.9, 0.7, 0.8]
    versions = [str(client.create_model_version(name, f"file:///nowhere/{i}", tags={"test_acc": str(a)}).version)
                for i, a in enumerate(accs)]
    write = MlflowClient.set_registered_model_alias

    def slow_write(self, model, alias, version):
        time.sleep(0.15 * (1 - accs[versions.index(str(version))]) * 10)  # 0.9 writes first, 0.6 last
        return write(self, model, alias, version)

    barrier, said = threading.Barrier(len(accs)), {}

    def finish(version: str, acc: float) -> None:
        barrier.wait()
        said[version] = promote(name, version, acc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MlflowClient, "set_registered_model_alias", slow_write)
        threads = [threading.Thread(target=finish, args=(v, a)) for v, a in zip(versions, accs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions[1], said
    assert said[versions[1]] == "champion" and len(said) == len(accs), said
    # a registry error while the champion is read is not "no champion" (the worst version would take it)
    def unavailable(self, model, alias):
        from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

        raise mlflow.exceptions.MlflowException("503 Service Unavailable", error_code=TEMPORARILY_UNAVAILABLE)

    worst = str(client.create_model_version(name, "file:///nowhere/x", tags={"test_acc": "0.1"}).version)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(mlflow.exceptions.MlflowException, match="503"):
        mp.setattr(MlflowClient, "get_model_version_by_alias", unavailable)
        promote(name, worst, 0.1)
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions[1]


def test_a_changed_space_or_a_bad_space_value_is_one_line_before_anything_runs(store, tmp_path, capsys):
    """Resuming a study with other batch-size choices (another --batch-size, recipe or model moves them)
    used to fail its invocation at the first trial, where Optuna refuses changed choices; a --space value
    outside a setting's bounds stopped the study at the first trial that drew it. Both are now one line
    before any data is searched, with no parent run and no trial."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    study = study_of(store, "choices")
    study.add_trial(optuna.trial.create_trial(
        params={**GOOD}, value=0.5,
        distributions={"lr": FloatDistribution(0.01, 0.25, log=True), "batch_size": CategoricalDistribution([32, 64, 128]),
                       "weight_decay": FloatDistribution(5e-5, 2.5e-3, log=True)}))
    space = tmp_path / "space.yaml"
    cases = {
        "choices": (["--batch-size", "256"], "study 'choices' searched batch_size over [32, 64, 128], this command over "
                                            "[64, 128, 256]: resume it with the settings it began with, or name a new --study"),
        "range": (["--space", str(space)], "search space: label_smoothing = 1.5: --label-smoothing takes a value from 0 "
                                          "(off) up to (not including) 1, not 1.5"),
    }
    space.write_text("label_smoothing: {low: 0.0, high: 1.5}\n")
    for name, (extra, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            main(["tune", "--data", store["data"], "--study", name, "--trials", "1", *extra, *COMMON])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"reslab: error: {message}" in err, err
        assert mlflow.get_experiment_by_name("cifar10") is None or not parent_runs(name)  # alone, nothing made it yet
    assert len(study_of(store, "choices").trials) == 1
    space.write_text("lr: 1e-3\n")  # YAML 1.1 reads this as text: a fixed value is checked too
    with pytest.raises(SystemExit):
        main(["tune", "--data", store["data"], "--study", "fixed", "--trials", "1", "--space", str(space), *COMMON])
    assert "search space: its fixed values: --lr takes a learning rate above 0, not '1e-3'" in capsys.readouterr().err
    # what only the dataset refutes: CIFAR-10's 32x32 images padded by 4 take crops up to 40 (a failed study before)
    space.write_text("crop_size: [0, 48]\n")
    with pytest.raises(SystemExit):
        main(["tune", "--data", store["data"], "--study", "crops", "--trials", "1", "--space", str(space), *COMMON])
    assert ("search space: crop_size = 48: --crop-size 48 does not fit the dataset's 32x32 images"
            in capsys.readouterr().err)
    assert mlflow.get_experiment_by_name("cifar10") is None or not parent_runs("crops")
    space.write_text("crop_size: [0, 40]\ncrop_pad: [0, 4]\n")  # each value fits alone; a 40-px crop needs the padding
    with pytest.raises(SystemExit):
        main(["tune", "--data", store["data"], "--study", "crops", "--trials", "1", "--space", str(space), *COMMON])
    assert ("search space: crop_size = 40 with crop_pad = 0: --crop-size 40 does not fit the dataset's 32x32 images"
            in capsys.readouterr().err)


def test_a_search_whose_first_trial_learns_nothing_stops_and_the_refit_gets_its_time(store, capsys):
    """A budgeted search whose recipe trial ends at the majority class's share (here a learning rate of 1e-7)
    ranks noise: it stops after that trial, in every worker, and the refit trains for the time the search
    would have spent (on a slower bf16 CPU make run's FER-2013 trials sat at 0.23-0.25 where 'happy' is 0.25)."""
    from tune.budget import CHANCE_MARGIN, learnt_nothing

    assert learnt_nothing(0.249, 0.251) and learnt_nothing(0.25 + CHANCE_MARGIN, 0.25)
    assert not learnt_nothing(0.323, 0.251)  # make run's FER-2013 recipe trial on the Intel Xeon: ranks
    tiny = str(Path(__file__).with_name("tiny-resnet9.yaml"))
    main(["tune", "--data", store["data"], "--study", "chance", "--budget", "48s", "--min-search-trials", "1",
          "--lr", "1e-7", "--config", tiny, "--no-progress"])
    out = capsys.readouterr().out
    assert "no better than always answering" in out and "the search stops and the refit gets its time" in out, out
    assert "queued slots not started: the search was stopped" in out, out
    study = study_of(store, "chance")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert [t.number for t in finished] == [0] and study.trials[0].value <= 0.1 + CHANCE_MARGIN, study.trials
    assert any(t.state == TrialState.WAITING for t in study.trials)  # the rest of the search never started
    (parent,) = parent_runs("chance")
    assert parent.data.tags["search_stopped"].startswith("trial 0 reached val_acc")
    plan, started = study.user_attrs["plan:1"], study.user_attrs["invocation"]["started"]
    assert plan["search_seconds"] >= 2 * plan["trial_seconds"], plan  # room for more trials: the stop made the difference
    refit = MlflowClient().get_run(versions_of("chance")[0].run_id)
    # the refit began before the search's share of the budget was over, and trains for what is left
    assert refit.info.start_time / 1000 - started < plan["search_seconds"], (refit.info.start_time / 1000 - started, plan)


def test_an_invocation_whose_workers_all_died_is_joined_only_when_that_continues_it(store, monkeypatch):
    """A ``kill -9``ed budgeted invocation left its parent run RUNNING, and every rerun of the same --study joined
    it: its plan and deadline were spent, so the rerun did nothing and registered nothing, for good. Now the
    invocation records its workers (host:pid:start): once all of them are gone from this host, a budgeted one
    (or one whose creator died before queueing its trials, or whose last worker died finalizing: its refit run is
    ended too) is ended KILLED and a new invocation starts; a plain one with trials left is still joined and
    continued, as before (the reaper test below)."""
    import socket

    from tune import parent
    from tune.slots import ready_key
    from train.tracking import experiment_id

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}:0"  # a start time no live process has, should the pid come back
    exp, client = experiment_id("cifar10"), MlflowClient()

    def killed_invocation(study: optuna.Study, budgeted: bool, queued: bool, finalizing: str) -> parent.Invocation:
        with monkeypatch.context() as m:  # the invocation's only worker is the dead process
            m.setattr(parent, "worker_id", lambda: dead)
            inv, created = parent.join_or_start(study, exp, 3, {}, {})
        assert created
        if budgeted:
            study.set_user_attr(f"plan:{inv.number}", {"seconds": 60})
        if queued:
            study.set_user_attr(ready_key(inv.number), 3)
        if finalizing == "refit":  # killed in its refit, the longest phase: a run of its own under the parent, still RUNNING
            study.set_user_attr(parent.finalized_key(inv.parent_run_id), dead)
            client.create_run(exp, tags={"mlflow.parentRunId": inv.parent_run_id, "kind": "refit"})
        if finalizing == "election":  # killed in the finalization's election (its half second): a candidate only,
            # whom every later election elected again, so each rerun joined, lost it and left the parent RUNNING
            study.set_user_attr(f"{parent.finalized_key(inv.parent_run_id)}@{dead}", {"at": time.time(), "value": dead})
        return inv

    for name, budgeted, queued, finalizing, joined in [
            ("dead-budget", True, True, "", False), ("dead-unqueued", False, False, "", False),
            ("dead-finalizing", False, True, "refit", False), ("dead-electing", False, True, "election", False),
            ("dead-plain", False, True, "", True)]:
        study = study_of(store, name)
        old = killed_invocation(study, budgeted, queued, finalizing)
        inv, created = parent.join_or_start(study, exp, 3, {}, {})
        assert (inv.number, created) == ((1, False) if joined else (2, True)), name
        first = client.get_run(old.parent_run_id)
        if joined:
            assert first.info.status == "RUNNING", name
        else:
            assert first.info.status == "KILLED" and first.data.tags["end_reason"] == parent.ABANDONED, name
        children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{old.parent_run_id}'")
        assert [r.info.status for r in children] == (["KILLED"] if finalizing == "refit" else []), name

    # a creator killed during its election (the 0.5 s settle): before, every rerun lost the election for that
    # number to it, joined it and waited 60 s for trials it never queued
    study = study_of(store, "dead-in-election")

    def killed_in_claim(study: optuna.Study, key: str, me: str, value=None):
        study.set_user_attr(f"{key}@{me}", {"at": time.time(), "value": value})
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(parent, "worker_id", lambda: dead)
        m.setattr(parent, "claim", killed_in_claim)
        parent.join_or_start(study, exp, 3, {}, {})
    (ghost,) = [a["value"] for k, a in study.user_attrs.items() if k.startswith("invocation#1@")]
    # two reruns at once: the other one is alive and on record for that election too (a rule that asked whether
    # every other worker of the number was dead saw it and joined the dead winner)
    study.set_user_attr(f"member:1:{socket.gethostname()}:{os.getppid()}", time.time())
    inv, created = parent.join_or_start(study, exp, 3, {}, {})
    assert (inv.number, created) == (2, True)
    assert client.get_run(ghost["parent_run_id"]).info.status == "KILLED"
    # a rerun that lost election 1 to that ghost after another worker had ended it moves on as well, above 1
    assert parent.died_in_election(client, study, ghost)
    again, created = parent.join_or_start(study, exp, 3, {}, {})
    assert (again, created) == (inv, False)  # the invocation now running is joined, never the ghost

    # a worker of the invocation still alive on this host: joined, whatever the kind
    study = study_of(store, "alive-budget")
    with monkeypatch.context() as m:
        m.setattr(parent, "worker_id", lambda: f"{socket.gethostname()}:{os.getpid()}")
        inv, _ = parent.join_or_start(study, exp, 3, {}, {})
    study.set_user_attr(f"plan:{inv.number}", {"seconds": 60})
    assert parent.join_or_start(study, exp, 3, {}, {}) == (inv, False)


def budgeted_invocation(store, monkeypatch, name: str, search_left: float | None, settings: dict | None = None):
    """A ``--budget`` invocation's creator, alive on this host, as it stands after planning: a 120-s plan whose
    search window closes in ``search_left`` seconds (negative: closed; None: no plan, a plain invocation), its
    three slots queued, its settings on record when given. Returns the invocation."""
    import dataclasses
    import socket

    from tune import parent
    from tune.budget import BudgetPlan
    from tune.slots import SlotStudy
    from train.tracking import experiment_id

    study, exp = study_of(store, name), experiment_id("cifar10")
    with monkeypatch.context() as m:
        m.setattr(parent, "worker_id", lambda: f"{socket.gethostname()}:{os.getpid()}")
        inv, created = parent.join_or_start(study, exp, 3, {}, {})
    assert created
    plan = BudgetPlan(seconds=120.0, deadline=0.0, images_per_sec=500.0, search_seconds=30.0, trial_subset=600,
                      trial_epochs=3, trial_val_fraction=0.25, trial_seconds=8.0)
    if search_left is not None:
        plan.deadline = time.time() + plan.seconds - plan.search_seconds + 0.5 * plan.trial_seconds + search_left
        study.set_user_attr(f"plan:{inv.number}", dataclasses.asdict(plan))
    if settings:
        study.set_user_attr(f"settings:{inv.number}", settings)
    SlotStudy(name, storage_of(store["journal"]), None, None, inv.number).provide(3)
    return inv


def test_a_worker_joining_after_the_search_closed_starts_no_trial_and_leaves_the_finish_to_the_creator(store, monkeypatch, capsys):
    """A ``--budget`` worker that joins once the search's last trial could start (its plan's search window over)
    has nothing left to run: it starts no trial and does not finalize, since the creator's last trial may still
    be starting and the refit is the creator's (before, a joiner with no time left went straight to finishing)."""
    from tune import parent

    inv = budgeted_invocation(store, monkeypatch, "late", search_left=-30)
    tiny = str(Path(__file__).with_name("tiny-resnet9.yaml"))
    main(["tune", "--data", store["data"], "--study", "late", "--budget", "2m", "--config", tiny, "--no-progress"])
    out = capsys.readouterr().out
    assert f"invocation {inv.number}: joined parent run {inv.parent_run_id}" in out, out
    assert "joined after the search's last trial could start: no trial here" in out, out
    study = study_of(store, "late")
    assert all(t.state == TrialState.WAITING for t in study.trials), study.trials  # none started here
    assert parent.finalized_key(inv.parent_run_id) not in study.user_attrs
    assert MlflowClient().get_run(inv.parent_run_id).info.status == "RUNNING"  # the creator's to end
    assert versions_of("late") == []

    # past the whole budget's deadline the creator is dead or late (on another host, where this one cannot tell):
    # a joiner finishes the invocation instead of leaving it RUNNING for every later command to join
    inv = budgeted_invocation(store, monkeypatch, "late-dead", search_left=-200)
    with pytest.raises(SystemExit):  # finished with no trial complete: nothing to register, one line
        main(["tune", "--data", store["data"], "--study", "late-dead", "--budget", "2m", "--config", tiny, "--no-progress"])
    assert "no trial here" not in capsys.readouterr().out
    assert parent.finalized_key(inv.parent_run_id) in study_of(store, "late-dead").user_attrs
    assert MlflowClient().get_run(inv.parent_run_id).info.status != "RUNNING"


def test_a_worker_joining_a_budgeted_invocation_prunes_as_its_creator_does(store, monkeypatch, capsys):
    """A worker that joined a ``--budget`` invocation without ``--budget`` (or with another ``--pruner``) ran the
    invocation's trials, sized by its plan, under its own default pruner (median over the whole study) where the
    creator's ASHA judged each trial against its own invocation's trials only. It follows the creator's settings
    (pruner, refit) and says so; its sampler starts with as many random trials as the creator's, and Hyperband spans
    the plan's trial length, in the creator too."""
    from optuna.pruners import HyperbandPruner, MedianPruner, SuccessiveHalvingPruner

    import tune.study
    from tune.pruning import OwnInvocation

    inv = budgeted_invocation(store, monkeypatch, "joined-pruner", search_left=60,
                              settings={"pruner": "asha", "prune_warmup": 2, "prune_after": 3, "refit": True})
    seen = []

    class Sampler(tune.study.TPESampler):
        """TPE, its random start on record (TPESampler keeps it private)."""

        def __init__(self, *, n_startup_trials: int, **kwargs) -> None:
            super().__init__(n_startup_trials=n_startup_trials, **kwargs)
            self.startup = n_startup_trials

    class Spy:
        """The trial's objective: records the pruner and sampler its trial meets, then stops the worker."""

        def __init__(self, *args, **kwargs) -> None:
            """Takes Objective's arguments and keeps none: it trains nothing."""

        def __call__(self, trial: optuna.Trial) -> float:
            seen.append((trial.study.pruner, trial.study.sampler.startup))
            raise KeyboardInterrupt

    class Hyperband(HyperbandPruner):
        """Hyperband, the epochs its brackets span on record (HyperbandPruner keeps them private)."""

        def __init__(self, *, min_resource: int, max_resource: int | str, **kwargs) -> None:
            super().__init__(min_resource=min_resource, max_resource=max_resource, **kwargs)
            self.span = (min_resource, max_resource)

    monkeypatch.setattr(tune.study, "Objective", Spy)
    monkeypatch.setattr(tune.study, "TPESampler", Sampler)
    monkeypatch.setattr(tune.study, "HyperbandPruner", Hyperband)
    tiny = str(Path(__file__).with_name("tiny-resnet9.yaml"))
    with pytest.raises(SystemExit):  # interrupted (130); without --budget a worker's own pruner is the median pruner
        main(["tune", "--data", store["data"], "--study", "joined-pruner", "--config", tiny, "--no-progress"])
    out = capsys.readouterr().out
    assert f"following invocation {inv.number}'s settings: pruner asha (warm-up 2, after 3), refit yes, budget 2:00" in out, out
    (pruner, startup), = seen
    assert isinstance(pruner, OwnInvocation) and isinstance(pruner.pruner, SuccessiveHalvingPruner)
    assert startup == 4  # the budget's random start, as the creator's (this worker's own: a third of its 20 trials)

    # the other way round: a --budget worker that joins a plain invocation runs it as its creator does (its budget
    # was ignored without a word, and its trials were pruned by ASHA within the invocation, the creator's by median)
    inv = budgeted_invocation(store, monkeypatch, "joined-plain", search_left=None,
                              settings={"pruner": "median", "prune_warmup": 1, "prune_after": 3, "refit": False})
    seen.clear()
    with pytest.raises(SystemExit):
        main(["tune", "--data", store["data"], "--study", "joined-plain", "--budget", "2m", "--config", tiny, "--no-progress"])
    out = capsys.readouterr().out
    assert f"following invocation {inv.number}'s settings: pruner median (warm-up 1, after 3), refit no, no budget" in out, out
    (pruner, startup), = seen
    assert isinstance(pruner, MedianPruner)
    assert startup == 3  # a third of the invocation's 3 trials, at least 3 (this worker's own, with --budget: 4)

    # Hyperband's brackets span the trials' length: the plan's 3 epochs, not the recipe's (the worker's own base)
    inv = budgeted_invocation(store, monkeypatch, "joined-hyperband", search_left=60,
                              settings={"pruner": "hyperband", "prune_warmup": 1, "prune_after": 3, "refit": False})
    seen.clear()
    with pytest.raises(SystemExit):
        main(["tune", "--data", store["data"], "--study", "joined-hyperband", "--config", tiny, "--epochs", "30",
              "--no-progress"])
    (pruner, _), = seen
    assert isinstance(pruner, Hyperband) and pruner.span == (1, 3), pruner.span

    # the creator of a budgeted invocation: its pruner is rebuilt once its plan (measured here) says the trials' length
    seen.clear()
    with pytest.raises(SystemExit):
        main(["tune", "--data", store["data"], "--study", "created-hyperband", "--budget", "2m", "--pruner", "hyperband",
              "--epochs", "1000", "--config", tiny, "--no-progress"])
    (pruner, _), = seen
    plan = study_of(store, "created-hyperband").user_attrs["plan:1"]
    assert pruner.span == (1, plan["trial_epochs"]) and plan["trial_epochs"] < 1000, (pruner.span, plan)


def test_stop_at_chance_judges_the_recipe_trial_even_when_a_sampled_one_finishes_first(store):
    """With several workers a sampled trial (here one at chance: a bad learning rate) can finish before the recipe's
    own trial. The rule judged whichever completed first, so that trial stopped the whole search although the
    recipe learns; it judges the recipe's trial, and stops the search when that one is at chance."""
    from types import SimpleNamespace

    import numpy as np

    from tune import parent
    from tune.slots import RECIPE_ATTR, SLOT_ATTR
    from tune.study import StopAtChance

    from train.tracking import experiment_id

    run = MlflowClient().create_run(experiment_id("cifar10"))
    inv = parent.Invocation(run.info.run_id, 1, 0, 3, time.time() - 60)
    data = SimpleNamespace(train_y=np.repeat(np.arange(10), 10), classes=[str(i) for i in range(10)])  # 10% each
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}

    def finished(study: optuna.Study, value: float, recipe: bool) -> optuna.trial.FrozenTrial:
        study.add_trial(optuna.trial.create_trial(params={"lr": 0.1}, distributions=dist, value=value,
                                                  user_attrs={SLOT_ATTR: 1, **({RECIPE_ATTR: True} if recipe else {})}))
        return study.trials[-1]

    learns, stops = optuna.create_study(direction="maximize"), []
    learns.stop = lambda: stops.append(True)  # Optuna's stop() works only inside optimize()
    sampled = finished(learns, 0.10, recipe=False)
    learns.enqueue_trial({"lr": 0.1}, user_attrs={SLOT_ATTR: 1, RECIPE_ATTR: True})  # the recipe, still to run
    StopAtChance(inv, data)(learns, sampled)
    assert "search_stopped:1" not in learns.user_attrs and not stops, "a sampled trial stopped the search"
    StopAtChance(inv, data)(learns, finished(learns, 0.60, recipe=True))
    assert "search_stopped:1" not in learns.user_attrs and not stops

    at_chance, stopped = optuna.create_study(direction="maximize"), []
    at_chance.stop = lambda: stopped.append(True)
    finished(at_chance, 0.60, recipe=False)
    StopAtChance(inv, data)(at_chance, finished(at_chance, 0.11, recipe=True))
    assert stopped and at_chance.user_attrs["search_stopped:1"].startswith("trial 1 reached val_acc 0.110")

    # a recipe trial pruned (a sampled trial promoted first at its rung) or failed: the first complete trial is
    # judged when the recipe gives up, else the rule would never judge anything
    gave_up, halted = optuna.create_study(direction="maximize"), []
    gave_up.stop = lambda: halted.append(True)
    sampled = finished(gave_up, 0.10, recipe=False)
    gave_up.enqueue_trial({"lr": 0.1}, user_attrs={SLOT_ATTR: 1, RECIPE_ATTR: True})
    recipe = gave_up.ask()  # running
    StopAtChance(inv, data)(gave_up, sampled)
    assert not halted
    gave_up.tell(recipe, state=TrialState.PRUNED)
    StopAtChance(inv, data)(gave_up, gave_up.trials[-1])
    assert halted and gave_up.user_attrs["search_stopped:1"].startswith("trial 0 reached val_acc 0.100")

    # no recipe trial (a resumed study): the first trial to *complete* is judged, once. The rule took the lowest
    # number, so a trial started earlier that finished later (another worker's) was judged again and could stop
    # a search whose first judged trial had learnt
    resumed, ended = optuna.create_study(direction="maximize"), []
    resumed.stop = lambda: ended.append(True)
    earlier, later = resumed.ask(), resumed.ask()
    for t in (earlier, later):
        t.set_user_attr(SLOT_ATTR, 1)
    resumed.tell(later, 0.55)
    StopAtChance(inv, data)(resumed, resumed.trials[later.number])
    resumed.tell(earlier, 0.10)
    StopAtChance(inv, data)(resumed, resumed.trials[earlier.number])
    assert not ended and "search_stopped:1" not in resumed.user_attrs


# --------------------------------------------------------------------------- processes: kill -9, out of memory


def reslab_env(store) -> dict[str, str]:
    """This module's store for a child process, one thread (2 shared cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "RESLAB_CACHE": str(store["root"] / "cache")}


@pytest.mark.slow
def test_reaper_fails_and_requeues_the_trial_of_a_killed_only_worker(store):
    """The only worker of a journal-file study is SIGKILLed inside its trial: the trial stays RUNNING
    (no heartbeat on a journal). Started again, ``reslab tune`` sees the dead pid on this host, fails
    that trial, ends its MLflow run KILLED, runs its queued retry, and keeps the budget of 1."""
    from optuna.storages import RetryFailedTrialCallback

    from tune.storage import STALE_REASON

    log = store["root"] / "reap.log"
    args = ["tune", "--data", store["data"], "--study", "reap", "--storage", str(log), "--trials", "1",
            "--pruner", "none", "--no-register", *COMMON]
    first = subprocess.Popen([*RESLAB, *args], cwd=store["root"], env=reslab_env(store),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    victim = None
    try:
        while victim is None:
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the worker never started a trial"
            if log.exists():
                try:
                    running = optuna.load_study(study_name="reap", storage=storage_of(log)).get_trials(
                        states=(TrialState.RUNNING,))
                except KeyError:  # the study is not created yet
                    running = []
                victim = next((t for t in running if "mlflow_run_id" in t.user_attrs), None)  # inside the objective
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stdout.close()
    left = optuna.load_study(study_name="reap", storage=storage_of(log)).trials
    assert [t.state for t in left] == [TrialState.RUNNING]  # what the kill left behind: the test's precondition

    second = subprocess.run([*RESLAB, *args], cwd=store["root"], env=reslab_env(store), capture_output=True,
                            text=True, timeout=400)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stdout[-3000:] + second.stderr[-3000:]
    trials = optuna.load_study(study_name="reap", storage=storage_of(log)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], [(t.number, t.state) for t in trials]
    dead, retry = trials
    assert dead.number == victim.number and RetryFailedTrialCallback.retried_trial_number(retry) == dead.number
    assert retry.params == dead.params  # the same configuration, run again
    client = MlflowClient()
    run = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.info.end_time and run.data.tags["fail_reason"] == STALE_REASON
    (parent,) = parent_runs("reap")  # the second process joined the killed one's invocation
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_this_invocation"] == 1
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.info.status == "FINISHED" and retry_run.data.tags["mlflow.parentRunId"] == parent.info.run_id


# The child process imports everything first, then caps its address space (RLIMIT_AS) at what it
# uses plus MARGIN and runs `reslab tune`: like a machine with MARGIN of memory free.
UNDER_A_MEMORY_CAP = """
import resource, sys
import matplotlib.pyplot, optuna.visualization, plotly.io, safetensors.torch, torch
import tune.study, tune.finalize
from train.cli import main
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]), vm + int(sys.argv[1])))
main(sys.argv[2:])
"""
MARGIN = 1 << 30  # 1 GiB: ResNet-20 at batch 32 needs ~0.1 GiB; ResNet-110 at batch 512 needs several


@pytest.mark.slow
def test_out_of_memory_trial_is_failed_and_the_study_goes_on(store, tmp_path):
    """Under a real memory cap, a trial whose activations cannot be allocated (ResNet-110 on a batch of
    512) gets the allocator's out-of-memory error; it is recorded FAIL with reason "out of memory" in
    Optuna and MLflow, and the study goes on to its summary: exit 0, parent FINISHED, the ResNet-20
    trial before it the best. (The failed trial runs last: after it the capped process's heap stays
    at the cap, so a further trial in the same process would run out of memory too.)"""
    space = tmp_path / "space.yaml"
    space.write_text("model: [resnet20, resnet110]\nbatch_size: [32, 512]\nlr: 0.05\nweight_decay: 0.0005\n")
    study = study_of(store, "oom")
    study.enqueue_trial({"model": "resnet20", "batch_size": 32})
    study.enqueue_trial({"model": "resnet110", "batch_size": 512})
    args = ["tune", "--data", store["data"], "--study", "oom", "--trials", "2", "--pruner", "none", "--no-register",
            "--space", str(space), *COMMON]
    proc = subprocess.run([sys.executable, "-c", UNDER_A_MEMORY_CAP, str(MARGIN), *args], cwd=store["root"],
                          env=reslab_env(store), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ok, oom = study_of(store, "oom").trials
    assert (ok.state, oom.state) == (TrialState.COMPLETE, TrialState.FAIL), proc.stdout[-3000:]
    assert oom.user_attrs["fail_reason"].startswith("out of memory: "), oom.user_attrs["fail_reason"]
    # the allocator's own error (PyTorch's, or oneDNN's inside a convolution), not an injected one
    assert any(m in oom.user_attrs["fail_reason"] for m in ("can't allocate memory", "could not create a primitive"))
    client = MlflowClient()
    run = client.get_run(oom.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == oom.user_attrs["fail_reason"]
    assert run.data.tags["state"] == "failed" and run.data.params["model"] == "resnet110"
    assert client.get_run(ok.user_attrs["mlflow_run_id"]).info.status == "FINISHED"
    (parent,) = parent_runs("oom")
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == "0"
    assert (parent.data.metrics["trials_fail"], parent.data.metrics["trials_complete"]) == (1, 1)


def test_parent_election_agrees_when_claims_land_a_settle_apart(store):
    """Three workers claim the study's parent run 0.4 s apart (less than the settle time, so each
    claim lands while an earlier one is still waiting): every one must get the same winner. Last-writer-wins gave A B's value while B went on to see C's and delete its own run, so A
    joined a deleted parent (a fresh-clone run of test_scaleout.py failed that way)."""
    import threading

    from tune import parent

    study = study_of(store, "election")
    got: dict[str, str] = {}

    def contender(name: str, delay: float) -> None:
        time.sleep(delay)
        got[name] = parent.claim(study, "leader", name)

    threads = [threading.Thread(target=contender, args=(n, d)) for n, d in (("A", 0.0), ("B", 0.4), ("C", 0.8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # all agree, on the earliest claim: A's, unless this host's load held A back past B (0.4 s), which a busy
    # test worker can; the bug this guards gave contenders different winners
    (winner,) = set(got.values())
    assert len(got) == 3 and winner in got, got
    attrs = study_of(store, "election").user_attrs
    assert attrs["leader"] == winner  # for those who come after the election
    # and the winner is the claim recorded first, whichever thread the host's load let write first
    earliest = min((c["at"], name) for name, c in attrs.items() if name.startswith("leader@"))
    assert attrs[earliest[1]]["value"] == winner, (earliest, winner)


def test_workers_starting_together_join_one_live_parent_run(store):
    """Four workers of one invocation start at once: one parent run, active, and every worker in it;
    the losers' runs are deleted."""
    import threading

    from tune import parent

    study = study_of(store, "together")
    exp = mlflow.get_experiment_by_name("cifar10") or mlflow.get_experiment(mlflow.create_experiment("cifar10"))
    barrier, got = threading.Barrier(4), []

    def worker() -> None:
        barrier.wait()
        got.append(parent.join_or_start(study, exp.experiment_id, 3, {}, {}))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({inv.parent_run_id for inv, _ in got}) == 1 and sum(created for _, created in got) == 1
    live = [r for r in parent_runs("together") if r.info.lifecycle_stage == "active"]
    assert [r.info.run_id for r in live] == [got[0][0].parent_run_id] and live[0].info.status == "RUNNING"


def test_a_tracking_hiccup_while_joining_is_an_error_not_a_second_invocation(store, monkeypatch):
    """Whether the study's invocation still runs is MLflow's to say, and every error of that call was read as "not
    running": one failed request (a tracking server restarting) made a worker start a second invocation beside the
    live one. Only a run the store lacks (another store's) is not running; any other error is raised."""
    from dataclasses import asdict

    from mlflow.exceptions import MlflowException

    from tune import parent
    from train.tracking import experiment_id

    study, exp = study_of(store, "hiccup"), experiment_id("cifar10")
    live, created = parent.join_or_start(study, exp, 3, {}, {})
    assert created

    def unreachable(self, run_id: str):  # what MLflow's REST client raises once its retries are spent
        raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed with exception "
                              "ConnectionError")

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "get_run", unreachable)
        with pytest.raises(MlflowException, match="ConnectionError"):
            parent.join_or_start(study, exp, 3, {}, {})
    assert study_of(store, "hiccup").user_attrs["invocation"] == asdict(live)  # no second invocation
    assert parent.join_or_start(study, exp, 3, {}, {}) == (live, False)  # it answers again: joined
    # a parent run this store never had is not running: the next invocation starts
    study.set_user_attr("invocation", {**asdict(live), "parent_run_id": "0" * 32})
    inv, created = parent.join_or_start(study, exp, 3, {}, {})
    assert created and inv.number == live.number + 1


def test_a_dataset_another_worker_logs_first_is_still_recorded(store, cifar):
    """MLflow's SQL store looks a dataset up, then inserts it; a study's workers logging a new one at the
    same moment can both miss it and all but one fail on the ``datasets`` primary key (a CI run of
    test_scaleout.py: ``UniqueViolation ... "dataset_pk"``, the worker exited 2). Here the other worker's
    insert lands, every time, between this run's lookup and its insert; the run must still get its inputs."""
    from mlflow.entities import Dataset, DatasetInput
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from train.config import TrainConfig
    from train.lineage import log_datasets
    from train.tracking import experiment_id

    client, exp = MlflowClient(), experiment_id("cifar10")
    other = client.create_run(exp, run_name="other-worker")
    raced: list[str] = []

    def other_worker_first(session, flush_context, instances) -> None:
        new = [o for o in session.new if getattr(o, "__tablename__", "") == "datasets"]
        if new and not raced:  # the other worker's own flush comes through here too: once is enough
            raced.append(new[0].name)
            ds = Dataset(new[0].name, new[0].digest, new[0].dataset_source_type, new[0].dataset_source)
            client.log_inputs(other.info.run_id, [DatasetInput(ds)])

    event.listen(Session, "before_flush", other_worker_first)
    try:
        with mlflow.start_run(experiment_id=exp, run_name="this-worker") as run:
            log_datasets(TrainConfig(dataset="cifar10", subset=600), cifar)
    finally:
        event.remove(Session, "before_flush", other_worker_first)
    assert raced == ["cifar10-train"]  # the race happened, on the first split logged
    got = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(d.dataset.name for d in got) == ["cifar10-test", "cifar10-train", "cifar10-validation"]
    (shared,) = client.get_run(other.info.run_id).inputs.dataset_inputs  # one dataset row, both runs' input
    assert (shared.dataset.name, shared.dataset.digest) == next((d.dataset.name, d.dataset.digest) for d in got
                                                                if d.dataset.name == "cifar10-train")
