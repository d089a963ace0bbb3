"""Scale-out, tested with real servers: a throw-away PostgreSQL cluster holds the Optuna studies and
the backend of an ``mlflow server``; ``reslab`` processes talk to both over loopback.

- two-process DDP training (``reslab train --nproc 2``) matches one process with the same global batch;
- three ``reslab tune`` workers share one study: the budget is met exactly, trial numbers are unique,
  all trials are nested under one MLflow parent run and the best model is registered once;
- the demo loads ``models:/cifar10-resnet@champion`` from the server;
- a worker killed with SIGKILL mid-trial: with ``--heartbeat`` its trial is failed and re-run by a
  survivor, its MLflow run is closed, the budget is still met exactly;
- ``reslab tune --nproc 2``: every trial trains with DDP on two processes, pruned on both at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from conftest import missing
from pgcluster import mlflow_server, pg_bin, postgres_cluster

# Minutes of servers, processes or budgets: run by CI (CI=true make test) and `make test-all`, not by a plain `make test`.
pytestmark = pytest.mark.slow


RESLAB = [str(Path(sys.executable).parent / "reslab")]  # the installed console script
TRIAL = ["--dataset", "cifar10", "--subset", "300", "--epochs", "1", "--batch-size", "32", "--no-progress"]
# A study whose mechanics are tested, not what it learns, on a small network: the test evaluation of its
# registered model takes seconds instead of most of a minute (tests/tiny-resnet9.yaml).
TINY = ["--config", str(Path(__file__).with_name("tiny-resnet9.yaml"))]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def child_env(**over: str) -> dict[str, str]:
    """The environment of a ``reslab`` process a test starts: no inherited MLflow or torchrun settings, one
    training thread, then ``over``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    return {**env, "OMP_NUM_THREADS": "1", **over}


@pytest.fixture(scope="module")
def team(tmp_path_factory, data_dir):
    """One PostgreSQL (databases ``mlflow`` and ``optuna``) and one MLflow server on it, for the module."""
    if pg_bin() is None:
        missing("PostgreSQL server binaries not installed (make test installs the postgresql package)")
    folder = tmp_path_factory.mktemp("team")
    with postgres_cluster() as pg:
        backend, storage = pg.create_database("mlflow"), pg.create_database("optuna")
        with mlflow_server(backend, folder / "artifacts", folder / "mlflow-server.log") as server:
            env = child_env(MLFLOW_TRACKING_URI=server.uri, RESLAB_MLRUNS=str(folder / "mlruns"), RESLAB_DATA=str(data_dir))
            yield SimpleNamespace(storage=storage, tracking_uri=server.uri, folder=folder, env=env,
                                  client=MlflowClient(server.uri, server.uri))


def start(team, args: list[str], name: str) -> subprocess.Popen:
    log = open(team.folder / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([*RESLAB, *args], cwd=team.folder, env=team.env, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(team, procs: dict[str, subprocess.Popen], timeout: float = 400) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    out = {}
    for name, p in procs.items():
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        out[name] = (team.folder / f"{name}.log").read_text()
        p.stdout and p.stdout.close()
    return out


# --------------------------------------------------------------------------- DDP


def test_two_process_ddp_matches_one_process(team, cifar, tmp_path):
    """Two DDP processes (torchrun, gloo, CPU) train well above chance and match ``fit`` in one process
    with the same global batch of 32 and seed. The only intended differences: BatchNorm statistics over
    each rank's 16 images instead of 32, and float summation order. Spies (tests/ddp_spy.py) record
    what each rank trained on and evaluated: disjoint training shards that together make the epoch,
    and evaluation slices that cover every validation image exactly once; equal weights on both ranks
    at the end (gradients were averaged). Measured (AVX-512 bf16 CPU, fp32): val acc 0.37-0.39 after
    3 epochs on 1,500 images (chance 0.10), DDP vs one process |delta train loss| 0.057; changing only
    the seed moves val loss by 0.065, the thread count train loss by 0.095 (docs/scale-out.md)."""
    import json
    from collections import Counter

    (tmp_path / "cfg.yaml").write_text("evaluate_test: false\n")
    args = ["--subset", "2000", "--val-fraction", "0.25", "--epochs", "3", "--batch-size", "32", "--lr", "0.05",
            "--augment", "none", "--precision", "fp32", "--seed", "0"]
    spy = Path(__file__).with_name("ddp_spy.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(spy),
                           str(tmp_path / "seen"), *args, "--no-progress", "--config", str(tmp_path / "cfg.yaml"),
                           "--experiment", "ddp", "--run-name", "ddp-2", "--checkpoint-dir", str(tmp_path / "ck")],
                          cwd=tmp_path, env=team.env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("MLflow run ") == 1  # rank 0 tracks, rank 1 does not
    exp = team.client.get_experiment_by_name("ddp")
    (run,) = team.client.search_runs([exp.experiment_id])  # exactly one run for two processes
    assert run.info.status == "FINISHED"
    assert (tmp_path / "ck" / "last.pt").exists()

    seen = [json.loads((tmp_path / "seen" / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0]["weights"] and seen[0]["weights"] == seen[1]["weights"]  # gradients averaged: one model
    assert len(seen[0]["eval"]) == len(seen[1]["eval"]) >= 3  # one validation pass per epoch, on both ranks
    for e0, e1 in zip(seen[0]["eval"], seen[1]["eval"]):
        assert e0["all"] == e1["all"] and len(e0["all"]) == 500
        assert Counter(e0["mine"]) + Counter(e1["mine"]) == Counter(e0["all"])  # every image once, none twice
        assert e0["mine"] and e1["mine"]  # both ranks did part of the work

    from train.config import TrainConfig
    from train.engine import fit

    from train.loader import BatchLoader

    single: dict[int, list[list[int]]] = {}
    batches = BatchLoader._batches

    def spy(self, epoch):  # the one-process run's batches, recorded like the ranks'
        out = batches(self, epoch)
        if self.shuffle:
            single[epoch] = [[int(i) for i in b] for b in out]
        return out

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BatchLoader, "_batches", spy)
        torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1): the thread count alone moves these losses by ~0.1
        try:
            ref = fit(TrainConfig(subset=2000, val_fraction=0.25, epochs=3, batch_size=32, lr=0.05, augment="none",
                                  precision="fp32", seed=0, evaluate_test=False, progress=False), cifar)
        finally:
            torch.set_num_threads(threads)
    assert sorted(single) == [0, 1, 2] and single[0] != single[1]
    for epoch, steps in single.items():
        r0, r1 = seen[0]["train"][str(epoch)], seen[1]["train"][str(epoch)]
        assert len(r0) == len(r1) == len(steps) == 1500 // 32
        for k, (a, b, both) in enumerate(zip(r0, r1, steps)):
            assert len(a) == len(b) == 16 and not set(a) & set(b), (epoch, k)  # each rank its own half
            assert set(a) | set(b) == set(both), (epoch, k)  # together: the one-process step's batch
    h = ref.history[-1]
    m = run.data.metrics
    steps = [x.value for x in team.client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(steps) == 3
    assert run.data.params["batch_size"] == "32"
    print("ddp vs one process:", {k: (round(m[k], 5), round(h[k], 5)) for k in ("train_loss", "val_loss", "train_acc", "val_acc")})
    assert m["val_acc"] > 0.25 and h["val_acc"] > 0.25  # well above chance (0.10): the comparison means something
    # Three epochs at lr 0.05 amplify any numerical difference (1 vs 2 threads: train loss 1.68 vs 1.58),
    # so the outcomes agree as two runs of one algorithm do, not bit for bit; the spies above prove the
    # mechanics exactly (same global batches, identical weights on both ranks, each image evaluated once).
    assert abs(m["train_loss"] - h["train_loss"]) < 0.12, (m["train_loss"], h["train_loss"])
    assert abs(m["val_loss"] - h["val_loss"]) < 0.12, (m["val_loss"], h["val_loss"])
    assert abs(m["val_acc"] - h["val_acc"]) < 0.07, (m["val_acc"], h["val_acc"])  # 500 images: 35 of them
    assert abs(m["train_acc"] - h["train_acc"]) < 0.06, (m["train_acc"], h["train_acc"])


def test_tune_trials_train_on_two_processes(team, tmp_path):
    """``reslab tune --nproc 2``: one study whose every trial trains with DDP on 2 processes. Rank 0
    alone talks to Optuna and MLflow; the sampled parameters and the pruner's decision reach rank 1
    through TorchDistributedTrial. The trials are queued through Optuna's API before the run (the CLI
    adopts queued trials as its slots), so the outcome does not depend on the sampler's draws: lr 1e-7,
    0.1, 1e-7. Trial 2 is trial 0 again (untrained, ~chance), below the median of trials 0 and 1 after
    epoch 1, so it is pruned on both ranks at once (a rank left behind would hang)."""
    (tmp_path / "space.yaml").write_text("lr: [0.1, 1.0e-7]\nbatch_size: 32\nweight_decay: 0.0005\n")
    queued = optuna.create_study(study_name="ddp-trials", storage=team.storage, direction="maximize")
    for lr in (1e-7, 0.1, 1e-7):
        queued.enqueue_trial({"lr": lr})
    args = ["tune", "--dataset", "cifar10", "--subset", "2000", "--epochs", "2", "--trials", "3", "--prune-after", "1", *TINY,
            "--prune-warmup", "0", "--space", str(tmp_path / "space.yaml"), "--storage", team.storage,
            "--study", "ddp-trials", "--experiment", "ddp-trials", "--no-register", "--no-progress", "--nproc", "2"]
    proc = subprocess.run([*RESLAB, *args], cwd=tmp_path, env=team.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "launching 2 data-parallel processes" in proc.stdout
    assert proc.stdout.count("invocation 1: started parent run") == 1  # rank 1 never opened the study
    trials = optuna.load_study(study_name="ddp-trials", storage=team.storage).get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.params["lr"] for t in trials] == [1e-7, 0.1, 1e-7]  # the queued trials, in order
    assert "3 trial(s) queued before this invocation run first" in proc.stdout
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED], \
        [(t.state, t.intermediate_values) for t in trials]
    assert trials[1].value > trials[0].value + 0.05  # the trained trial learned something
    exp = team.client.get_experiment_by_name("ddp-trials")
    runs = {int(r.data.tags["optuna.trial"]): r for r in team.client.search_runs([exp.experiment_id], "tags.kind = 'trial'")}
    assert sorted(runs) == [0, 1, 2]
    assert {r.data.tags["world_size"] for r in runs.values()} == {"2"}  # each trial trained on 2 processes
    assert [runs[i].info.status for i in range(3)] == ["FINISHED", "FINISHED", "KILLED"]
    (parent,) = team.client.search_runs([exp.experiment_id], "tags.kind = 'study'")
    assert parent.info.status == "FINISHED"


def test_a_budget_too_short_to_search_refits_on_two_processes(data_dir, tmp_path):
    """``reslab tune --budget`` under ``--nproc 2`` with a budget far too short to search: no trial; the
    base configuration is refit for the whole budget on both ranks, tested and registered once, by rank 0,
    and the parent run and the version say the search was skipped (the one-process path is
    test_make_run.py's)."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = child_env(MLFLOW_TRACKING_URI=uri, RESLAB_MLRUNS=str(tmp_path / "mlruns"), RESLAB_DATA=str(data_dir))
    args = ["tune", "--dataset", "cifar10", "--budget", "30s", *TINY, "--study", "short",
            "--no-progress", "--nproc", "2"]
    proc = subprocess.run([*RESLAB, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "launching 2 data-parallel processes" in proc.stdout
    assert "too short to search" in proc.stdout and "; no trials (no search);" in proc.stdout
    assert proc.stdout.count("registered cifar10-resnet version") == 1  # rank 1 registers nothing
    client = MlflowClient(uri, uri)
    (only,) = client.search_model_versions("name = 'cifar10-resnet'")
    mv = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert mv.version == only.version and mv.tags["search"] == "skipped" and "trial" not in mv.tags
    run = client.get_run(mv.run_id)
    assert run.info.run_name == "refit-base" and run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert run.data.params["subset"] == "None" and run.data.metrics["train_images"] == 50000  # all of them
    assert float(run.data.params["time_budget"]) > 0 and run.data.metrics["budget_steps"] > 0
    assert "test_acc" in run.data.metrics
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["search"] == "skipped" and parent.info.status == "FINISHED"
    assert not client.search_runs([run.info.experiment_id], "tags.kind = 'trial'")  # no trial ran

# --------------------------------------------------------------------------- one study, three workers


@pytest.fixture(scope="module")
def shared_study(team):
    """Three workers started together on one PostgreSQL study with a budget of 6 trials."""
    args = ["tune", *TRIAL, *TINY, "--storage", team.storage, "--study", "shared", "--trials", "6", "--experiment", "shared"]
    procs = {f"shared-worker{i}": start(team, args, f"shared-worker{i}") for i in range(3)}
    logs = finish(team, procs)
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{logs[name][-4000:]}"
    return SimpleNamespace(study=optuna.load_study(study_name="shared", storage=team.storage), logs=logs)


def test_three_workers_share_one_study_and_budget(team, shared_study):
    trials = shared_study.study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(6))  # each trial once, no duplicates, no extras
    assert all(t.state in FINISHED for t in trials), [t.state for t in trials]
    assert sum(t.state in FINISHED for t in trials) == 6
    assert len({t.user_attrs.get("worker") for t in trials}) >= 2, [t.user_attrs.get("worker") for t in trials]  # shared
    logs = shared_study.logs.values()
    assert sum("started parent run" in log for log in logs) == 1 and sum("joined parent run" in log for log in logs) == 2

    exp = team.client.get_experiment_by_name("shared")
    runs = team.client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "study"]  # one parent for the study
    children = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == list(range(6))
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert all(r.info.status != "RUNNING" for r in children) and parent.info.status == "FINISHED"

    versions = team.client.search_model_versions("name='cifar10-resnet'")
    mine = [v for v in versions if v.tags.get("study") == "shared"]
    assert len(mine) == 1, [(v.version, v.tags) for v in versions]  # registered once, not once per worker
    assert int(mine[0].tags["trial"]) == shared_study.study.best_trial.number


def test_demo_loads_the_champion_from_the_server(team, shared_study, cifar, monkeypatch):
    """The team setup's serving side: the demo's loader against the MLflow server (PostgreSQL + artifacts)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.tracking_uri)
    from demo.serving import ServedModel
    from train.tracking import setup_tracking

    previous = mlflow.get_tracking_uri()
    setup_tracking(team.tracking_uri)
    try:
        served = ServedModel("models:/cifar10-resnet@champion")
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)
    assert served.classes == cifar.classes
    probs = served.probabilities(list(cifar.test_x[:8]))
    assert probs.shape == (8, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    # What the demo serves is what the study chose: the champion is the shared study's best trial, and
    # on 500 real test images its served probabilities (the demo's own preprocessing and network, from
    # the registered version) match the engine's evaluation of that trial's own weights (the safetensors
    # the trial kept, the training normalization), so the accuracies agree too. A wrong version, wrong
    # weights or a wrong mean/std fails.
    from train.engine import Runtime, evaluate
    from tune.finalize import _trial_network

    mv = team.client.get_model_version_by_alias("cifar10-resnet", "champion")
    best = shared_study.study.best_trial
    assert mv.run_id == best.user_attrs["mlflow_run_id"]
    from train.config import TrainConfig

    cfg = TrainConfig.from_dict(best.user_attrs["config"])
    mlflow.set_tracking_uri(team.tracking_uri)
    try:
        trial_net = _trial_network(mv.run_id, cfg, cifar).eval()
    finally:
        mlflow.set_tracking_uri(previous)
    x, y = cifar.test_x[:500], cifar.test_y[:500]
    ref = evaluate(trial_net, x, y, Runtime(torch.device("cpu"), "fp32", False, torch.tensor(cifar.mean), torch.tensor(cifar.std)))
    probs = served.probabilities(list(x))
    assert np.abs(probs - ref.probs).max() < 1e-3, np.abs(probs - ref.probs).max()
    assert (probs.argmax(1) == y).mean() == pytest.approx(ref.accuracy)


# --------------------------------------------------------------------------- a worker killed mid-trial


@pytest.fixture(scope="module")
def killed_study(team):
    """Worker A starts alone with --heartbeat 2 and is SIGKILLed inside its first trial; once its
    heartbeat is stale (2 x 2 s), worker B joins and must finish the budget of 4 trials."""
    name = "killed"
    args = ["tune", *TRIAL, "--storage", team.storage, "--study", name, "--trials", "4", "--heartbeat", "2",
            "--experiment", name, "--no-register"]
    a = start(team, args, "killed-worker-a")
    deadline = time.monotonic() + 300
    victim = None
    while victim is None:
        assert a.poll() is None, (team.folder / "killed-worker-a.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "worker A never started a trial"
        try:
            running = optuna.load_study(study_name=name, storage=team.storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            running = []
        victim = next((t for t in running if "mlflow_run_id" in t.user_attrs), None)  # inside the objective
        time.sleep(0.2)
    a.send_signal(signal.SIGKILL)
    assert a.wait(30) == -signal.SIGKILL
    # wait until A's trial is stale by the storage's own rule and clock (no heartbeat for 2 x 2 s, on
    # PostgreSQL's now()), as worker B will judge it; a deadline instead of a guessed sleep
    watcher = optuna.storages.RDBStorage(team.storage, heartbeat_interval=2, grace_period=4)
    study_id = watcher.get_study_id_from_name(name)
    deadline = time.monotonic() + 120
    while victim._trial_id not in watcher._get_stale_trial_ids(study_id):
        assert time.monotonic() < deadline, \
            f"the killed worker's trial never went stale (now {watcher.get_trial(victim._trial_id).state.name})"
        time.sleep(0.2)
    watcher.remove_session()
    logs = finish(team, {"killed-worker-b": start(team, args, "killed-worker-b")})
    return SimpleNamespace(study=optuna.load_study(study_name=name, storage=team.storage), victim=victim, logs=logs)


def test_killed_worker_trial_is_failed_retried_and_its_run_closed(team, killed_study):
    for name, log in killed_study.logs.items():
        assert "Traceback" not in log, f"worker {name}:\n{log[-4000:]}"
    trials = {t.number: t for t in killed_study.study.get_trials(deepcopy=False)}
    victim = trials[killed_study.victim.number]
    assert victim.state == TrialState.FAIL  # the heartbeat marked it failed
    retries = [t for t in trials.values() if RetryFailedTrialCallback.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED), retries
    assert retries[0].params == victim.params  # the same configuration, re-run by a survivor
    # The study reaches its budget exactly and nothing is left waiting: 4 trials besides the victim,
    # whose retry counts in its place.
    assert all(t.state in FINISHED for t in trials.values()), [(t.number, t.state) for t in trials.values()]
    assert len(trials) == 5, [(t.number, t.state) for t in trials.values()]

    run = team.client.get_run(killed_study.victim.user_attrs["mlflow_run_id"])
    assert run.info.status in ("KILLED", "FAILED") and run.info.end_time  # not RUNNING forever
    assert "heartbeat" in run.data.tags.get("fail_reason", "")
    retry_run = team.client.get_run(retries[0].user_attrs["mlflow_run_id"])
    assert retry_run.info.run_id != run.info.run_id and retry_run.info.status in ("FINISHED", "KILLED")
    (parent,) = [r for r in team.client.search_runs([run.info.experiment_id]) if r.data.tags.get("kind") == "study"]
    assert parent.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == retry_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
