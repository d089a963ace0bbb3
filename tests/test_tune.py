"""``reslab tune`` end to end on a real CIFAR-10 subset: real Optuna studies, a real MLflow store
and registry, and a real ``reslab ui`` server on loopback."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import free_port, module_store, process_tree, stop, wait_for_server
from train.cli import main
from train.data import stratified_subset

TRAIN_IMAGES, TEST_IMAGES = 600, 200
COMMON = ["--epochs", "1", "--model", "resnet20", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_cifar(cifar, tmp_path_factory) -> Path:
    """A small image-folder copy of real CIFAR-10 (600 train / 200 test), so a trial takes seconds
    and the chosen model's test evaluation is quick."""
    root = tmp_path_factory.mktemp("tiny-cifar10")
    for split, x, y, n in (("train", cifar.train_x, cifar.train_y, TRAIN_IMAGES), ("test", cifar.test_x, cifar.test_y, TEST_IMAGES)):
        for i in stratified_subset(y, n, seed=1):
            f = root / split / cifar.classes[y[i]] / f"{i}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(f)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_cifar):
    """One embedded store (MLflow SQLite + Optuna journal) shared by the studies of this module."""
    from train.tracking import setup_tracking

    tmp = tmp_path_factory.mktemp("tune-store")
    with module_store(tmp, RESLAB_CACHE=str(tmp / "cache")):
        setup_tracking()
        yield {"root": tmp, "journal": tmp / "mlruns" / "optuna" / "journal.log", "data": str(tiny_cifar)}


def journal_study(store, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    store["journal"].parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(store["journal"])))
    return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)


def child_runs(parent_id: str) -> dict[int, mlflow.entities.Run]:
    runs = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("cifar10").experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {int(r.data.tags["optuna.trial"]): r for r in runs}


def parent_runs(study: str) -> list[mlflow.entities.Run]:
    return MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("cifar10").experiment_id],
        f"tags.kind = 'study' and tags.`optuna.study` = '{study}'", order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def first_study(store):
    """Three trials queued through Optuna's own API: a sound one, one too slow to learn (pruned after
    epoch 1 against the first), and one with an absurd learning rate (diverges, fails)."""
    study = journal_study(store, "t1")
    study.enqueue_trial({"lr": 0.05, "batch_size": 32, "weight_decay": 5e-4})
    study.enqueue_trial({"lr": 1e-5, "batch_size": 128, "weight_decay": 5e-4})
    study.enqueue_trial({"lr": 1e4, "batch_size": 32, "weight_decay": 5e-4})
    with pytest.warns(UserWarning, match="out of range"):  # Optuna notes the queued values outside the space
        main(["tune", "--data", store["data"], "--study", "t1", "--trials", "3", "--prune-after", "1", *COMMON])
    return journal_study(store, "t1")


def test_trials_are_nested_runs_with_their_state(first_study):
    trials = first_study.get_trials()
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"], states
    assert trials[2].user_attrs["fail_reason"].startswith("diverged: loss became")

    (parent,) = parent_runs("t1")
    assert parent.info.status == "FINISHED"
    assert first_study.user_attrs["invocation"]["parent_run_id"] == parent.info.run_id
    assert json.loads(parent.data.params["search_space"])["searched"].keys() == {"lr", "batch_size", "weight_decay"}
    children = child_runs(parent.info.run_id)
    assert sorted(children) == [0, 1, 2]
    assert [children[i].data.tags["state"] for i in range(3)] == ["complete", "pruned", "failed"]
    assert [children[i].info.status for i in range(3)] == ["FINISHED", "KILLED", "FAILED"]
    assert children[2].data.tags["fail_reason"] == trials[2].user_attrs["fail_reason"]
    assert "below the pruner's bar" in children[1].data.tags["prune_reason"]
    for t in trials:
        run = children[t.number]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        # the searched lr is for the base's batch of 128; the trial trains at lr * batch / 128
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"] * t.params["batch_size"] / 128)
        assert run.data.metrics["trial_seconds"] > 0
    # per-epoch metrics carry their step; the pruned trial's epoch was logged before it stopped
    hist = MlflowClient().get_metric_history(children[0].info.run_id, "val_acc")
    assert [(m.step, m.value) for m in hist] == [(1, pytest.approx(trials[0].value))]
    assert MlflowClient().get_metric_history(children[1].info.run_id, "val_acc")[0].value == pytest.approx(
        trials[1].intermediate_values[1])
    # the parent holds the study summary
    m = parent.data.metrics
    assert (m["trials_complete"], m["trials_pruned"], m["trials_fail"]) == (1, 1, 1)
    assert m["best_val_acc"] == pytest.approx(trials[0].value)
    plots = {Path(a.path).name for a in MlflowClient().list_artifacts(parent.info.run_id, "optuna")}
    assert {"optimization_history.html", "parallel_coordinate.html", "slice.html", "trials.csv"} <= plots
    assert "param_importances.html" not in plots  # needs two complete trials


def test_registered_version_matches_its_trial(first_study, store):
    best = first_study.best_trial
    client = MlflowClient()
    mv = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert str(mv.version) == "1"
    assert mv.tags["study"] == "t1" and mv.tags["trial"] == str(best.number) == "0"
    assert json.loads(mv.tags["params"]) == best.params
    assert float(mv.tags["val_acc"]) == pytest.approx(best.value)
    assert mv.run_id == best.user_attrs["mlflow_run_id"]
    run = client.get_run(mv.run_id)
    # the test split was used once, on the chosen model only
    assert float(mv.tags["test_acc"]) == pytest.approx(run.data.metrics["test_acc"])
    tested = [r.info.run_id for r in child_runs(run.data.tags["mlflow.parentRunId"]).values() if "test_acc" in r.data.metrics]
    assert tested == [run.info.run_id]
    assert float(run.data.params["batch_size"]) == best.params["batch_size"]
    assert run.info.status == "FINISHED"
    # the registered model is the best trial's network: on that trial's validation images it scores
    # the trial's validation accuracy (within 2 of the 60 images: the trial ran in bf16, this in fp32)
    import torch

    from train.augment import normalize
    from train.data import load_dataset, split_validation

    model = mlflow.pytorch.load_model(f"models:/cifar10-resnet/{mv.version}")
    data = load_dataset("cifar10", store["data"], progress=False)
    _, val = split_validation(data.train_y, 0.1, seed=0)
    x = normalize(torch.from_numpy(data.train_x[val]), torch.tensor(data.mean), torch.tensor(data.std), False)
    with torch.no_grad():
        acc = (model(x).argmax(1).numpy() == data.train_y[val]).mean()
    assert len(val) == 60 and abs(acc - best.value) <= 2 / 60 + 1e-9, (acc, best.value)


def test_resume_extends_the_same_study_and_refits(first_study, store):
    main(["tune", "--data", store["data"], "--study", "t1", "--trials", "1", "--refit", *COMMON])
    study = journal_study(store, "t1")
    assert study._study_id == first_study._study_id
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert study.trials[3].state.is_finished()
    first, second = parent_runs("t1")
    assert (first.data.tags["invocation"], second.data.tags["invocation"]) == ("1", "2")
    assert second.data.metrics["trials_this_invocation"] == 1
    children = MlflowClient().search_runs([first.info.experiment_id], f"tags.mlflow.parentRunId = '{second.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(["trial-3", f"refit-trial-{study.best_trial.number}"])
    # --refit: the best configuration retrained on train+val, then tested and registered as version 2
    client = MlflowClient()
    mv = client.get_model_version("cifar10-resnet", "2")
    refit = client.get_run(mv.run_id)
    assert refit.info.run_name == f"refit-trial-{study.best_trial.number}"
    assert refit.data.params["val_fraction"] == "0.0" and mv.tags["refit"] == "True"
    assert mv.tags["trial"] == str(study.best_trial.number)
    assert json.loads(mv.tags["params"]) == study.best_trial.params
    assert study.user_attrs["registered_versions"][str(study.best_trial.number)] == "2"
    v1 = client.get_model_version("cifar10-resnet", "1")
    expected = "champion" if float(mv.tags["test_acc"]) > float(v1.tags["test_acc"]) else "challenger"
    assert str(client.get_model_version_by_alias("cifar10-resnet", expected).version) == "2"


def test_worse_model_does_not_take_champion(first_study, store, tmp_path):
    """A study whose --space pins a learning rate too small to learn anything registers a worse
    model: it becomes challenger and the champion stays."""
    client = MlflowClient()
    champion = client.get_model_version_by_alias("cifar10-resnet", "champion")
    space = tmp_path / "space.yaml"
    space.write_text("lr: 1.0e-6\nbatch_size: 256\nweight_decay: {low: 1.0e-5, high: 1.0e-4, log: true}\n")
    main(["tune", "--data", store["data"], "--study", "t2", "--trials", "1", "--pruner", "none",
          "--space", str(space), *COMMON])
    study = journal_study(store, "t2")
    assert list(study.best_trial.params) == ["weight_decay"]  # lr and batch size were fixed by the file
    mv = client.get_model_version(
        "cifar10-resnet", study.user_attrs["registered_versions"][str(study.best_trial.number)])
    assert float(client.get_run(mv.run_id).data.params["lr"]) == 1e-6
    assert float(mv.tags["test_acc"]) < float(champion.tags["test_acc"])  # the precondition of this test
    assert client.get_model_version_by_alias("cifar10-resnet", "champion").version == champion.version
    assert client.get_model_version_by_alias("cifar10-resnet", "challenger").version == mv.version


def test_space_file_and_durations(tmp_path):
    from train.budget import parse_duration
    from train.config import TrainConfig
    from tune.space import SearchSpace

    f = tmp_path / "s.yaml"
    f.write_text("label_smoothing: {low: 0.0, high: 0.2}\nmodel: [resnet20, resnet32]\nepochs: 5\n"
                 "lr: {low: 0.01, high: 0.2, log: true}\n")
    base = TrainConfig(dataset="cifar10", model="resnet20")
    s = SearchSpace.build(base, f)
    assert set(s.distributions) == {"lr", "batch_size", "weight_decay", "label_smoothing", "model"}
    assert s.distributions["lr"].high == 0.2 and s.distributions["lr"].log
    assert s.distributions["batch_size"].choices == (32, 64, 128)  # a quarter, a half and all of the base's 128
    assert s.lr_batch == 128
    cfg = s.config(base, {"lr": 0.1, "batch_size": 32, "weight_decay": 1e-4})
    assert cfg.lr == pytest.approx(0.025) and cfg.batch_size == 32  # linear scaling to the batch
    assert s.fixed == {"epochs": 5}
    # a budget whose trials are too short to rank batch sizes pins the base's (tune/budget.py) ...
    assert s.pins(base, batch_size_searched=False) == {"batch_size": 128}
    assert s.pins(base, batch_size_searched=True) == {}
    # ... unless the user's file asks for batch sizes to be searched
    f.write_text("batch_size: [64, 128, 256]\n")
    assert SearchSpace.build(base, f).pins(base, batch_size_searched=False) == {}
    f.write_text("test_set: [1, 2]\n")
    with pytest.raises(ValueError, match="not a searchable"):
        SearchSpace.build(base, f)
    f.write_text("model: [resnet20, resnet7]\n")
    with pytest.raises(ValueError, match="unknown model"):
        SearchSpace.build(base, f)
    assert [parse_duration(t) for t in ("90", "90s", "30m", "2h", "1h30m")] == [90, 90, 1800, 7200, 5400]
    with pytest.raises(ValueError):
        parse_duration("2 hours")


def test_ui_serves_the_store_and_lists_runs(first_study, store):
    from train.cli import ui_command

    port = free_port()
    cmd, env = ui_command("127.0.0.1", port)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(f"{base}/health", proc, 90,
                        lambda: proc.stderr.read().decode() if proc.poll() is not None else "")
        # the server and its uvicorn process, not MLflow's job runner and its huey consumers (eight processes
        # more, ~1.4 GB, for GenAI jobs reslab has none of); the runner starts before the server answers
        tree = process_tree(proc.pid)
        assert len(tree) == 2 and not [c for c in tree if "jobs" in c or "huey" in c], tree
        exp_id = mlflow.get_experiment_by_name("cifar10").experiment_id
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp_id], "max_results": 100}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            runs = json.load(r)["runs"]
        served = {r["info"]["run_id"] for r in runs}
        assert {t.user_attrs["mlflow_run_id"] for t in first_study.trials} <= served
        assert first_study.user_attrs["invocation"]["parent_run_id"] in served
    finally:
        stop(proc)
        proc.stderr.close()


@pytest.mark.parametrize("warmup, pruned", [(1, True), (3, False)])
def test_prune_warmup_is_the_first_rung_of_successive_halving(warmup, pruned):
    """--prune-warmup was logged but dropped under asha (what --budget and make run use): its first rung stayed
    at epoch 1. A trial worst of four at epoch 1 is pruned there only when the first rung is epoch 1."""
    from train.config import TrainConfig
    from tune.space import SearchSpace
    from tune.study import TuneOptions, make_pruner

    opts = TuneOptions(base=TrainConfig(), space=SearchSpace({}, {}), study="s", pruner="asha", prune_warmup=warmup)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(opts))
    for value in (0.9, 0.8, 0.7):
        trial = study.ask()
        trial.report(value, 1)
        trial.should_prune()
        study.tell(trial, value)
    worst = study.ask()
    worst.report(0.1, 1)
    assert worst.should_prune() == pruned


@pytest.mark.parametrize("budget", [None, 60.0])
def test_a_budgeted_invocations_trials_are_pruned_against_its_own_trials_only(budget):
    """A resumed --budget study sizes new trials for the new invocation (tune/budget.py), so its first trial at
    epoch 1 is not compared with an earlier invocation's epoch 1 (here three trials at 0.9 on other data): with a
    budget it meets no peer and goes on; without one every trial is the same length and the earlier ones count."""
    from train.config import TrainConfig
    from tune.slots import SLOT_ATTR
    from tune.space import SearchSpace
    from tune.study import TuneOptions, make_pruner

    opts = TuneOptions(base=TrainConfig(), space=SearchSpace({}, {}), study="s", pruner="asha", budget=budget)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(opts))

    def trial_of(invocation: int) -> optuna.Trial:
        study.enqueue_trial({}, user_attrs={SLOT_ATTR: invocation})
        return study.ask()

    for value in (0.9, 0.9, 0.9):
        trial = trial_of(1)
        trial.report(value, 1)
        assert not trial.should_prune()
        study.tell(trial, value)
    new = trial_of(2)
    new.report(0.5, 1)
    assert new.should_prune() == (budget is None)
    if budget is None:
        study.tell(new, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(new, 0.5)
    worse = trial_of(2)  # ...and among its own trials it prunes as before: below the first at the rung
    worse.report(0.2, 1)
    assert worse.should_prune()
