"""`reslab experiment degradation` and `reslab compare` on tiny budgets, against a real MLflow store.

The paper's ordering (deeper plain nets train worse) is not asserted: at this size it is noise.
"""

from __future__ import annotations

import dataclasses
import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import module_store
from train.cli import main
from train.config import TrainConfig
from train.engine import fit
from train.models import count_parameters, create_model
from train.tracking import experiment_id, log_fit

SUBSET, TEST_IMAGES, CURVE_IMAGES = 300, 200, 100


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir):
    """One MLflow store for the module: the experiment runs once, compare reads it back."""
    with module_store(tmp_path_factory.mktemp("experiment"), RESLAB_DATA=str(data_dir)) as tmp:
        yield tmp


@pytest.fixture(scope="module")
def degradation(store, cifar):
    """Run the real command once: plain20 and resnet20, one epoch on 300 images."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["experiment", "degradation", "--depths", "20", "--subset", str(SUBSET), "--epochs", "1",
              "--curve-images", str(CURVE_IMAGES), "--test-images", str(TEST_IMAGES), "--no-log-models",
              "--no-progress", "--output", str(store / "figure")])
    client = MlflowClient()
    exp = client.get_experiment_by_name("degradation-cifar10")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    return {"stdout": out.getvalue(), "parent": parents[0], "children": children, "client": client, "dir": store}


def test_experiment_creates_nested_runs_with_one_recipe(degradation):
    parent, children = degradation["parent"], degradation["children"]
    assert sorted(children) == ["plain20", "resnet20"]
    assert len(degradation["client"].search_runs([parent.info.experiment_id])) == 3
    for name, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["model"] == name and run.data.tags["depth"] == "20"
        assert run.data.params["subset"] == str(SUBSET) and run.data.params["test_images"] == str(TEST_IMAGES)
    # One shared recipe: every training option but the model is identical, and it is the cpu preset's.
    p, r = (children[n].data.params for n in ("plain20", "resnet20"))
    assert {k: v for k, v in p.items() if k != "model"} == {k: v for k, v in r.items() if k != "model"}
    assert (p["weight_decay"], p["schedule"], p["milestones"], p["momentum"], p["nesterov"]) == ("0.0001", "step", "[0.5, 0.75]", "0.9", "False")
    assert parent.data.tags["preset"] == "cpu"
    assert "300-image stratified subset of cifar10 train; 1 epochs" in degradation["stdout"]


def test_experiment_figure_and_table_hold_the_logged_numbers(degradation):
    client, parent, children = degradation["client"], degradation["parent"], degradation["children"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"degradation.png", "degradation.md", "degradation.json"} <= names
    png = Image.open(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="degradation.png"))
    assert png.width > 1000 and png.height > 400
    table = (degradation["dir"] / "figure" / "degradation.md").read_text()
    data = json.loads((degradation["dir"] / "figure" / "degradation.json").read_text())
    iterations = SUBSET // 128  # batches of 128 without the ragged last one
    for name, run in children.items():
        m = run.data.metrics
        hist = client.get_metric_history(run.info.run_id, "curve_train_error")
        assert [h.step for h in hist] == [iterations]  # x axis: iterations, one point per epoch
        test_curve = client.get_metric_history(run.info.run_id, "curve_test_error")
        assert [h.step for h in test_curve] == [iterations]
        assert m["test_error"] == pytest.approx(1 - m["test_acc"])
        series = data["curves"][name]
        assert series["steps"] == [iterations]
        assert series["train_error"] == pytest.approx([hist[0].value])
        assert series["heldout_error"] == pytest.approx([test_curve[0].value])
        row = next(r for r in data["rows"] if r["model"] == name)
        assert row["params"] == count_parameters(create_model(name)) == 269722  # the paper's 0.27M
        assert row["run_id"] == run.info.run_id
        label = "plain" if name.startswith("plain") else "ResNet"
        line = f"| {label} | 20 | 0.27M | {iterations} | {m['final_train_error']:.2%} | {m['test_error']:.2%} |"
        assert line in table and line in degradation["stdout"]


def test_experiment_rejects_a_model_flag(store, capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "degradation", "--model", "resnet20"])
    assert e.value.code == 2 and "--model does not apply" in capsys.readouterr().err


def _extra_preact_run(cifar) -> str:
    """A pre-activation ResNet trained outside the experiment (another parent), logged like `reslab train`."""
    small = dataclasses.replace(cifar, test_x=cifar.test_x[:TEST_IMAGES], test_y=cifar.test_y[:TEST_IMAGES])
    cfg = TrainConfig(model="resnet20v2", subset=SUBSET, epochs=1, progress=False).resolved()
    with mlflow.start_run(experiment_id=experiment_id("cifar10"), run_name="v2", tags={"model": cfg.model, "dataset": "cifar10"}) as run:
        mlflow.log_params({"model": cfg.model, "dataset": "cifar10"})
        log_fit(fit(cfg, small), small, log_model_=False)
    return run.info.run_id


def test_compare_reports_every_selected_run_with_its_logged_numbers(degradation, cifar, capsys):
    client, parent, children = degradation["client"], degradation["parent"], degradation["children"]
    v2 = _extra_preact_run(cifar)
    out = degradation["dir"] / "report"
    capsys.readouterr()
    main(["compare", "--runs", parent.info.run_id, v2, "--output", str(out)])  # the parent stands for its children
    printed = capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    rows = {r["run_id"]: r for r in report["runs"]}
    assert set(rows) == {*(c.info.run_id for c in children.values()), v2}
    md = (out / "compare.md").read_text()
    html = (out / "compare.html").read_text()
    for run_id, row in rows.items():
        run = client.get_run(run_id)
        m = run.data.metrics
        for key in ("test_acc", "test_precision_macro", "test_recall_macro", "test_f1_macro", "train_seconds", "train_images_per_sec"):
            assert row[key] == m[key], key
        assert row["f1_per_class"] == {c: m[f"test_f1_{c}"] for c in cifar.classes}
        logged = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_report.json")).read())
        assert row["confusion_matrix"] == logged["confusion_matrix"]
        cm = np.asarray(row["confusion_matrix"])
        assert cm.sum() == TEST_IMAGES and np.trace(cm) / cm.sum() == pytest.approx(m["test_acc"])
        assert row["params"] == 269722 and row["flops_per_image"] > 0
        cells = f"| {row['run_name']} ({run_id[:8]}) | {row['model']} |"
        assert cells in md and cells in printed
        assert f"| {m['test_acc']:.4f} | {m['test_precision_macro']:.4f} | {m['test_recall_macro']:.4f} | {m['test_f1_macro']:.4f} |" in md
        assert f"{m['test_acc']:.4f}" in html
    by_model = {r["model"]: r for r in rows.values()}
    assert by_model["plain20"]["kind"] == "baseline CNN (plain)"
    assert by_model["resnet20v2"]["kind"] == "pre-activation ResNet"
    for arch in ("resnet20", "resnet20v2"):  # each residual net is set against the plain net of its depth
        assert by_model[arch]["baseline_run_id"] == by_model["plain20"]["run_id"]
        assert by_model[arch]["acc_vs_baseline"] == pytest.approx(by_model[arch]["test_acc"] - by_model["plain20"]["test_acc"])
    assert "<img alt='confusion matrices' src='data:image/png;base64," in html
    assert Image.open(out / "confusion_matrices.png").width > 3 * Image.open(out / "confusion_matrices.png").height / 2
    # The report is logged as a new compare run, which later comparisons skip (it has no test metrics).
    compare_runs = client.search_runs([client.get_experiment_by_name("compare").experiment_id])
    assert len(compare_runs) == 1
    assert {a.path for a in client.list_artifacts(compare_runs[0].info.run_id)} >= {"compare.md", "compare.html", "confusion_matrices.png", "compare.json"}
    assert set(compare_runs[0].data.tags["compared_runs"].split(",")) == set(rows)


def test_compare_by_tag_and_experiment(degradation, capsys):
    # a `reslab evaluate --log` run lands in the dataset's experiment with test metrics but no training: not a row
    exp = MlflowClient().get_experiment_by_name("degradation-cifar10").experiment_id
    with mlflow.start_run(experiment_id=exp, run_name="evaluate-somemodel",
                          tags={"evaluated_model": "models:/x/1", "family": "residual"}):
        mlflow.log_metric("test_acc", 0.5)
    main(["compare", "--experiment", "degradation-cifar10", "--tag", "family=residual"])
    md = capsys.readouterr().out
    assert "| resnet20 (" in md and "| plain20 (" not in md and "no plain net of this depth" in md
    assert "evaluate-somemodel" not in md and md.count("| resnet20 (") == 1, md


def test_compare_needs_a_selection(store, capsys):
    with pytest.raises(SystemExit):
        main(["compare"])
    assert "say which runs to compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--experiment", "no-such-experiment"])
    assert "no MLflow experiment named 'no-such-experiment'" in capsys.readouterr().err


def test_flops_from_the_architecture_name():
    from train.compare import kind_of
    from train.flops import model_cost

    params20, flops20 = model_cost("resnet20", 10, 3, 32)
    params56, flops56 = model_cost("resnet56", 10, 3, 32)
    # He et al. 2015 Table 6: 0.27M and 0.85M parameters; ~41M and ~125M multiply-adds (2 FLOPs each).
    assert (params20, params56) == (269722, 853018)
    assert 40e6 < flops20 / 2 < 42e6 and 124e6 < flops56 / 2 < 127e6
    assert kind_of("resnet18") == "ImageNet-style ResNet" and kind_of("plain56") == "baseline CNN (plain)"


@pytest.mark.parametrize("ema, tta", [(0.9, 1), (0.0, 0)])
def test_the_test_curve_scores_the_weights_and_views_the_table_scores(mlflow_store, cifar, tmp_path, ema, tta):
    """With --ema (and --tta) the curve scored the last step's raw weights on one view while the table's test error
    came from the average with its views: the figure's last point disagreed with the table (0.880 against 0.890)."""
    from train.config import TrainConfig
    from train.engine import Runtime, evaluate, fit
    from train.experiment import TestCurve

    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, subset=300, epochs=2, batch_size=64,
                      ema=ema, tta=tta, checkpoint_dir=str(tmp_path / "ck"), evaluate_test=False, progress=False).resolved()
    x, y = cifar.test_x[::50], cifar.test_y[::50]
    curve = TestCurve(cfg, cifar, x, y)
    with mlflow.start_run():
        result = fit(cfg, cifar, callbacks=[curve])
    scored = evaluate(result.model, x, y, Runtime.create(cfg, cifar), cfg.tta)  # what the table's error is of
    assert len(curve.errors) == 2 and curve.errors[-1] == pytest.approx(1 - scored.accuracy)
