"""Training really learns, resumes exactly, fails clearly, and lands complete in MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import missing
from train.cli import main
from train.config import TrainConfig
from train.engine import DivergedError, Runtime, fit, load_pretrained, predict
from train.models import create_model

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(progress=False, batch_size=64)


class StopAfter(Exception):
    """Raised by a callback to interrupt training at a chosen epoch."""


def test_short_training_learns_well_above_chance(cifar):
    result = fit(TrainConfig(dataset="cifar10", subset=3000, epochs=3, **FAST), cifar)
    # evaluated on all 10,000 held-out test images; chance is 10%
    assert result.test is not None and len(result.test.labels) == 10000
    assert result.test.accuracy > 0.30, result.test.accuracy
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert all(h["images_per_sec"] > 0 and 0 <= h["val_acc"] <= 1 for h in result.history)


def small_recipe(name: str = "fast-cpu", **over) -> TrainConfig:
    """The named recipe for CIFAR-10 on a few real images and epochs (no time budget), its ResNet-9 at width 16
    instead of 32: a quarter of the FLOPs (the EMA test below 90 s -> 28 s on one AVX2 thread, 2026-12-06)."""
    from train.config import recipe

    d = {**recipe(name, "cifar10"), "time_budget": None, "subset": 1200, "val_fraction": 0.25, "batch_size": 128,
         "lr": 0.1, "epochs": 3, "seed": 7, "evaluate_test": False, "progress": False, "model_args": {"width": 16}, **over}
    return TrainConfig.from_dict(d)


def test_resume_ends_with_the_same_metrics(cifar, tmp_path):
    """Interrupted after epoch 2 of 3 and resumed == uninterrupted (CPU, fixed seed), on the fast-cpu
    recipe: its EMA of the weights, flip TTA, label smoothing, Nesterov and one-cycle state all resume."""
    cfg = small_recipe()
    assert cfg.ema and cfg.tta and cfg.model == "resnet9"
    full = fit(TrainConfig(**{**cfg.to_dict(), "checkpoint_dir": str(tmp_path / "a")}), cifar)

    def stop(epoch, metrics):
        if epoch == 1:
            raise StopAfter

    interrupted = TrainConfig(**{**cfg.to_dict(), "checkpoint_dir": str(tmp_path / "b")})
    with pytest.raises(StopAfter):
        fit(interrupted, cifar, callbacks=[stop])
    resumed = fit(interrupted, cifar, resume=tmp_path / "b")
    assert len(resumed.history) == 3
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert resumed.history[-1][key] == full.history[-1][key], key
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_resume_does_not_read_the_pretrained_file_again(cifar, tmp_path):
    """A run started from --pretrained/--init-from (whose file is an MLflow download in a temp folder) resumed
    after that file was gone: the resume failed reading weights its checkpoint replaces anyway."""
    weights = tmp_path / "start.pt"
    torch.save(create_model("resnet9", 10, 3, width=8).state_dict(), weights)
    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, subset=400, batch_size=64, epochs=2,
                      pretrained=str(weights), evaluate_test=False, progress=False, checkpoint_dir=str(tmp_path / "ck"))

    def stop(epoch, metrics):
        raise StopAfter

    with pytest.raises(StopAfter):
        fit(cfg, cifar, callbacks=[stop])
    weights.unlink()
    assert len(fit(cfg, cifar, resume=tmp_path / "ck").history) == 2


def test_a_checkpoint_without_a_loss_scaler_resumes_where_fp16_enables_one(cifar, tmp_path, monkeypatch):
    """A run saved where the grad scaler is off (CPU, bf16 GPUs: its state is {}) resumed with ``--device cuda``
    on a GPU that gets fp16 and an enabled scaler: loading {} into it raised, the run ended FAILED. The GPU's
    enabled scaler is stood in for by an enabled CPU one."""
    import train.engine

    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, subset=400, batch_size=64, epochs=2,
                      evaluate_test=False, progress=False, checkpoint_dir=str(tmp_path / "ck"))

    def stop(epoch, metrics):
        raise StopAfter

    with pytest.raises(StopAfter):
        fit(cfg, cifar, callbacks=[stop])
    assert torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["scaler"] == {}
    made, real = [], torch.amp.GradScaler

    def enabled_scaler(device: str, enabled: bool = True, **kw) -> torch.amp.GradScaler:
        made.append(real(device, enabled=True, **kw))
        return made[-1]

    monkeypatch.setattr(train.engine.torch.amp, "GradScaler", enabled_scaler)
    assert len(fit(cfg, cifar, resume=tmp_path / "ck").history) == 2
    assert made and made[0].is_enabled()


def test_a_recipe_follows_the_dataset_and_model_it_is_given(tmp_path):
    """--recipe picked its CIFAR-10 section when the dataset came from --config (FER-2013 trained at CIFAR-10's
    batch, rate and crops), and a recipe's ResNet-9 options crashed another --model (resnet20 has no width)."""
    from train.cli import build_parser, config_from_args
    from train.models import create_model

    def cfg(*argv: str) -> TrainConfig:
        return config_from_args(build_parser().parse_args(["train", "--recipe", "fast-cpu", *argv]))

    (tmp_path / "fer.yaml").write_text("dataset: fer2013\n")
    from_file, flag = cfg("--config", str(tmp_path / "fer.yaml")), cfg("--dataset", "fer2013")
    assert from_file.dataset == "fer2013" and from_file.to_dict() == flag.to_dict()
    assert (flag.batch_size, flag.crop_size) == (256, 40)
    other = cfg("--model", "resnet20")
    assert other.model_args == {} and create_model(other.model, 10, 3, **other.model_args) is not None
    assert cfg("--model", "resnet9").model_args == cfg().model_args == {"width": 32}  # its own network keeps them


def test_ema_and_tta_are_what_is_evaluated(cifar):
    """With ``ema`` the weights evaluated and returned are the average, not the last step's: the
    same run without EMA trains identically (EMA does not feed back) but returns other weights.
    With ``tta`` the reported accuracy is that of the recipe's augmented prediction (level 2: flips and shifts)."""
    from train.engine import Runtime, evaluate

    ema = fit(small_recipe(batch_size=64, lr=0.2), cifar)
    raw = fit(small_recipe(batch_size=64, lr=0.2, ema=0.0), cifar)
    assert [h["train_loss"] for h in ema.history] == [h["train_loss"] for h in raw.history]  # same training
    differ = [k for k, a in ema.model.state_dict().items() if a.is_floating_point() and not torch.equal(a, raw.model.state_dict()[k])]
    assert len(differ) > 10
    assert ema.val.accuracy != raw.val.accuracy or not np.allclose(ema.val.probs, raw.val.probs)
    assert ema.val.accuracy > 0.2  # well above chance (10%) after three epochs on 900 images (measured 0.37)
    # the per-epoch validation (MLflow's val curve) is of the average too: its last epoch is the final evaluation
    assert ema.history[-1]["val_loss"] == pytest.approx(ema.val.loss, rel=1e-6)

    from train.data import split_validation, stratified_subset

    idx = stratified_subset(cifar.train_y, 1200, 7)
    _, val = split_validation(cifar.train_y[idx], 0.25, seed=0)
    x_val, y_val = cifar.train_x[idx[val]], cifar.train_y[idx[val]]
    assert np.array_equal(ema.val.labels, y_val)  # the same 300 validation images the run used
    rt = Runtime(torch.device("cpu"), ema.precision, True, torch.tensor(cifar.mean), torch.tensor(cifar.std))
    assert small_recipe().tta == 2
    flipped = evaluate(ema.model, x_val, y_val, rt, tta=2)
    plain = evaluate(ema.model, x_val, y_val, rt, tta=0)
    assert flipped.accuracy == ema.val.accuracy
    np.testing.assert_allclose(flipped.probs, ema.val.probs, atol=1e-6)
    assert not np.allclose(plain.probs, ema.val.probs, atol=1e-3)  # TTA changed what was reported


def test_tta_level_2_adds_the_image_shifted_a_pixel_each_way(cifar):
    """``--tta 2`` = half the flip-averaged logits of the image, half those of the image shifted one pixel
    up-left and down-right (reflect padding), computed here independently on the uint8 images; the
    levels parse from the CLI and from recipes' true/false, and a budget counts 6 forward passes."""
    from train.budget import TimeBudget
    from train.cli import build_parser, config_from_args
    from train.config import TTA_VIEWS
    from train.engine import Runtime, predict
    from train.models import create_model
    from train.pretrained import load_published

    published = Path(__file__).resolve().parents[2] / "shared" / "pretrained" / "resnet20-12fca82f.th"
    if not published.exists():
        missing(f"published weights not found: {published}")
    model = load_published(create_model("resnet20"), published)  # trained weights: logits worth comparing
    x = cifar.test_x[:64]
    rt = Runtime(torch.device("cpu"), "fp32", True, torch.tensor(cifar.mean), torch.tensor(cifar.std))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, :-2, :-2], padded[:, 2:, 2:]
    assert not np.array_equal(up_left, x)
    expected = (predict(model, x, rt, 1) + (predict(model, up_left, rt, 1) + predict(model, down_right, rt, 1)) / 2) / 2
    got = predict(model, x, rt, 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    one = predict(model, x, rt, 1)
    assert (got - one).abs().max() > 0.02 * one.abs().max()  # the shifted views changed the answer

    def tta(*argv: str) -> int:
        return config_from_args(build_parser().parse_args(["train", "--dataset", "cifar10", *argv])).resolved().tta

    assert (tta(), tta("--tta"), tta("--tta", "2"), tta("--recipe", "fast-cpu", "--tta", "0")) == (0, 1, 2, 0)
    with pytest.raises(ValueError, match="level"):
        TrainConfig(tta=3).resolved()
    assert TrainConfig.from_dict({"tta": True}).resolved().tta == 1
    one, six = (TimeBudget(100, 50, 100, 1000, 2000, TTA_VIEWS[level]) for level in (1, 2))
    assert six.eval_seconds(1000, 0.1) == pytest.approx(3 * one.eval_seconds(1000, 0.1))


def test_adamw_and_cosine(cifar):
    """AdamW (decoupled decay on weights only) under a cosine schedule with warm-up trains above chance;
    the schedule has its shape (warm-up to 1, half way 0.5, zero at the end)."""
    from train.engine import lr_factor, make_optimizer

    cfg = TrainConfig(dataset="cifar10", subset=1200, epochs=2, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                      schedule="cosine", warmup=0.1, evaluate_test=False, **FAST)
    opt = make_optimizer(create_model("resnet20", 10, 3), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    f = [lr_factor("cosine", s, 1000, 0.1, [], 0.1) for s in (0, 50, 100, 325, 550, 775, 1000)]
    assert f == pytest.approx([0.0, 0.5, 1.0, 0.5 * (1 + 2**-0.5), 0.5, 0.5 * (1 - 2**-0.5), 0.0], abs=1e-9)
    # --warmup 1 (all warm-up) is allowed: the scheduler's step after the last update divided 0 by 0
    assert [lr_factor("onecycle", s, 1000, 1.0, [], 0.1) for s in (500, 1000)] == [0.5, 0.0]
    result = fit(cfg, cifar)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # decayed to zero at the last step
    assert result.val.accuracy > 0.2, result.val.accuracy


def test_max_steps_caps_a_time_budget_and_gives_way_to_epochs(cifar):
    """--max-steps with --time-budget is the most the budget plans: the run used to stop only between epochs,
    past the cap, with its schedule unfinished. --epochs replaces a recipe's step count as it replaces its budget."""
    from train.cli import build_parser, config_from_args

    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, subset=600, batch_size=32,
                      time_budget=300.0, max_steps=25, evaluate_test=False, progress=False, val_fraction=0.1)
    result = fit(cfg, cifar)  # 17 steps an epoch: the cap falls inside the second
    assert result.history[-1]["step"] == 25 and result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9), result.history
    paper = build_parser().parse_args(["train", "--recipe", "degradation-paper", "--epochs", "10"])
    assert (config_from_args(paper).max_steps, config_from_args(paper).epochs) == (None, 10)
    steps = build_parser().parse_args(["train", "--recipe", "degradation-paper", "--epochs", "10", "--max-steps", "99"])
    assert config_from_args(steps).max_steps == 99


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_is_fused_on_the_cpu_and_updates_as_the_per_tensor_one(optimizer, monkeypatch):
    """make_optimizer's fused kernel (one pass over all parameters) makes the same update as PyTorch's
    per-tensor loop, weight decay on weights only and Nesterov momentum included."""
    from train import engine

    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 2e-3, weight_decay=5e-4)
    torch.manual_seed(0)
    models = [create_model("resnet20", 10, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = engine.make_optimizer(models[0], cfg)
    monkeypatch.setattr(engine, "FUSED_OPTIMIZER_DEVICES", ())
    loop = engine.make_optimizer(models[1], cfg)
    assert [o.defaults["fused"] for o in (fused, loop)] == [True, None]
    start = [p.detach().clone() for p in models[0].parameters()]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for m, opt in zip(models, (fused, loop)):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(models[0].parameters(), start))  # every tensor moved
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_a_clear_error(cifar):
    with pytest.raises(DivergedError, match=r"loss became (nan|inf|[0-9.e+]+) .*lower --lr"):
        fit(TrainConfig(dataset="cifar10", subset=300, epochs=1, lr=1e20, schedule="constant", evaluate_test=False, **FAST), cifar)


def test_transfer_from_cifar_to_fer_keeps_matching_layers(tmp_path):
    src = create_model("resnet20", 10, 3)
    torch.save(src.state_dict(), tmp_path / "cifar.pt")
    dst = create_model("resnet20", 7, 1)
    n, skipped = load_pretrained(dst, str(tmp_path / "cifar.pt"))
    assert set(skipped) == {"fc.weight", "fc.bias"}  # another class count: a fresh classifier
    assert n == len(src.state_dict()) - 2
    # the grayscale stem takes the colour filters summed over RGB (a gray image is R = G = B)
    torch.testing.assert_close(dst.stem[0].weight, src.stem[0].weight.sum(1, keepdim=True))
    assert torch.equal(dst.layers[2][0].conv1.weight, src.layers[2][0].conv1.weight)


def run_cli(*args: str) -> None:
    main(["train", "--no-progress", *args])


def test_cli_run_is_complete_in_mlflow_and_the_model_loads_back(mlflow_store, data_dir, cifar, capsys):
    run_cli("--data", str(data_dir), "--subset", "1000", "--epochs", "2", "--batch-size", "64",
            "--register", "cifar10-resnet", "--run-name", "t1")
    client = MlflowClient()
    exp = client.get_experiment_by_name("cifar10")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "t1"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["model"] == "resnet20" and p["epochs"] == "2" and p["batch_size"] == "64" and p["subset"] == "1000"
    for key in ("git_commit", "device", "torch_version", "dataset_source", "dataset_hash", "precision"):
        assert t.get(key), key
    assert t["dataset_hash"] == cifar.fingerprint
    val_acc = client.get_metric_history(run.info.run_id, "val_acc")
    assert [x.step for x in val_acc] == [1, 2]
    # the time-to-accuracy curve: the same accuracies, stepped by the wall-clock second each was reached
    history = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="history.json")).read_text())
    by_time = client.get_metric_history(run.info.run_id, "val_acc_by_wall_second")
    assert [x.value for x in by_time] == [x.value for x in val_acc]
    assert [x.step for x in by_time] == [round(h["wall_seconds"]) for h in history]
    assert history[1]["wall_seconds"] > history[0]["wall_seconds"] > 0
    from train.tracking import epoch_logger  # a run of minutes, where seconds and epochs part ways

    with mlflow.start_run(run_name="curve") as curve:
        epoch_logger(0, {"epoch": 1, "val_acc": 0.5, "wall_seconds": 41.6})
        epoch_logger(1, {"epoch": 2, "val_acc": 0.7, "wall_seconds": 83.2})
    assert [(x.step, x.value) for x in client.get_metric_history(curve.info.run_id, "val_acc_by_wall_second")] == [(42, 0.5), (83, 0.7)]
    for key in ("test_acc", "test_precision_macro", "test_recall_macro", "test_f1_macro", "test_f1_cat", "train_images_per_sec"):
        assert key in m, key
    arts = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/curves.png", "plots/confusion_matrix.png", "test_report.json", "history.json"} <= arts
    report = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="test_report.json")).read_text())
    assert np.asarray(report["confusion_matrix"]).sum() == 10000
    assert abs(report["accuracy"] - m["test_acc"]) < 1e-9

    # registered, with the champion alias; loads back through MLflow's pt2 path (no pickle)
    mv = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert str(mv.version) == "1" and mv.tags["run_id"] == run.info.run_id
    loaded = mlflow.pytorch.load_model("models:/cifar10-resnet@champion")
    info = mlflow.models.get_model_info("models:/cifar10-resnet@champion")
    meta = info.metadata
    assert meta["classes"] == cifar.classes and meta["image_size"] == 32 and meta["channels"] == 3
    rt = Runtime(torch.device("cpu"), "fp32", False, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))
    x = cifar.test_x[:256]
    logits = predict(loaded, x, rt)
    from train.tracking import rebuild_module

    module, _ = rebuild_module("models:/cifar10-resnet@champion")
    ref = predict(module, x, rt)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    # the pt2 model reproduces the logged test accuracy (training evaluated it in bf16)
    all_logits = predict(loaded, cifar.test_x, rt)
    acc = (all_logits.argmax(1).numpy() == cifar.test_y).mean()
    assert abs(acc - m["test_acc"]) < 0.02
    assert "registered cifar10-resnet version 1 (alias: champion)" in capsys.readouterr().out
    # MLflow 3 as a user sees it (issue 15): the data as run inputs, one per split with its context, the
    # fingerprint as digest and its size; the test metrics on the logged model, against the test data;
    # the version registered with its tags and a model card as description
    inputs = {}
    for d in run.inputs.dataset_inputs:
        tags = {x.key: x.value for x in d.tags}
        inputs[tags["mlflow.data.context"]] = (d.dataset.name, d.dataset.digest, tags["images"])
    fp = cifar.fingerprint[:36]
    assert inputs == {"train": ("cifar10-train", fp, "900"), "validation": ("cifar10-validation", fp, "100"),
                      "test": ("cifar10-test", fp, "10000")}
    (output,) = run.outputs.model_outputs
    assert mv.source == f"models:/{output.model_id}"
    linked = {x.key: x for x in mlflow.get_logged_model(output.model_id).metrics}
    assert linked["test_acc"].value == m["test_acc"] and linked["test_f1_cat"].value == m["test_f1_cat"]
    assert (linked["test_acc"].dataset_name, linked["test_acc"].dataset_digest) == ("cifar10-test", fp)
    assert mv.tags["model"] == "resnet20" and float(mv.tags["test_acc"]) == m["test_acc"] and mv.tags["lr"]
    card = mv.description
    assert card.startswith("**cifar10-resnet** version 1: resnet20 trained on cifar10"), card
    assert f"train 900 images, validation 100 images, test 10000 images (fingerprint `{fp}`" in card, card
    assert "epochs=2" in card and "batch_size=64" in card and "subset=1000" in card, card
    assert f"test accuracy {m['test_acc']:.4f}" in card, card

    # transfer learning: FER-2013 initialised from our own registered CIFAR-10 model, named as every other command
    # takes it (name@alias without models:/, which --init-from alone refused: "No such artifact")
    no_test = Path("no-test.yaml")  # what is checked here is the start, not the test split (a minute of evaluation)
    no_test.write_text("evaluate_test: false\n")
    run_cli("--dataset", "fer2013", "--model", "resnet20", "--data", str(data_dir), "--subset", "300", "--epochs", "1",
            "--init-from", "cifar10-resnet@champion", "--run-name", "transfer", "--config", str(no_test))
    fer_run = client.search_runs([client.get_experiment_by_name("fer2013").experiment_id])[0]
    assert fer_run.data.tags["init_from"] == "cifar10-resnet@champion"
    expected = len(create_model("resnet20", 7, 1).state_dict()) - 2  # all but the classifier (the stem is adapted to gray)
    assert f"initialised {expected} tensors" in capsys.readouterr().out


def test_cli_bad_input_is_one_clear_line_and_reslab_debug_shows_the_traceback(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "RESLAB_MLRUNS": str(tmp_path / "mlruns")}
    cmd = [str(Path(sys.executable).parent / "reslab"), "train", "--data", str(tmp_path / "missing.zip")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"reslab: error: {tmp_path / 'missing.zip'}: no such file or folder (expected a cifar10 zip, image folder, or archive)"]
    debug = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**env, "RESLAB_DEBUG": "1"}, timeout=120)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "DataError: " in debug.stderr and "no such file or folder" in debug.stderr


@pytest.mark.parametrize("flag, value, shown", [
    ("--epochs", "0", "0"), ("--epochs", "-2", "-2"), ("--batch-size", "0", "0"), ("--lr", "0", "0.0"),
    ("--lr", "-1", "-1.0"), ("--lr", "nan", "nan"), ("--weight-decay", "-3", "-3.0"), ("--momentum", "2", "2.0"),
    ("--label-smoothing", "1.5", "1.5"), ("--ema", "1.5", "1.5"), ("--warmup", "2", "2.0"),
    ("--val-fraction", "-0.1", "-0.1"), ("--max-steps", "0", "0"), ("--workers", "0", "0"), ("--seed", "-1", "-1"),
    ("--gamma", "-1", "-1.0"), ("--milestones", "-5", "[-5.0]"),  # a negative lr: gradient ascent
])
def test_a_setting_out_of_range_is_one_line_before_anything_starts(capsys, mlflow_store, tmp_path, flag, value, shown):
    """Each of these once trained anyway (a default in place of 0, a diverging or frozen run) or ended in a traceback.
    The data is missing as well: the settings are checked first, so a missing check shows as the data's error."""
    from train.config import BOUNDS

    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path / "missing.zip"), flag, value])
    takes = BOUNDS[flag[2:].replace("-", "_")][1]
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"reslab: error: {flag} takes {takes}, not {shown}"]


@pytest.mark.parametrize("text, line", [
    ("lr: [1, 2\n", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2)"),
    ("epochs: ten\n", None),
])
def test_a_config_file_that_is_not_valid_is_one_line(capsys, mlflow_store, tmp_path, text, line):
    """Both were tracebacks (yaml's ParserError; a TypeError comparing 'ten' with 1)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(cfg), "--data", str(tmp_path / "missing.zip")])
    expected = f"{cfg}: {line}" if line else "--epochs takes a whole number of epochs, at least 1, not 'ten'"
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"reslab: error: {expected}"]


@pytest.mark.parametrize("args, line", [
    (["tune", "--storage", "bogus://x"], "--storage bogus://x cannot be opened (Can't load plugin: sqlalchemy.dialects:bogus)"),
    (["tune", "--timeout", "0"], "--timeout must be above 0"),
    (["train", "--nproc", "0"], "--nproc must be at least 1"),
    (["bench", "--rounds", "0", "--pipelines", "bogus"], "--rounds takes 1 or more and --warmup-steps 0 or more (here 0 and 3)"),
    (["demo", "--batch-size", "0", "--port", "99999"], "--batch-size and --queue-size take 1 or more (here 0 and 64)"),
    (["demo", "--max-file-size", "0", "--port", "99999"],
     "--max-file-size 0: give a size above 0 with its unit, e.g. 500kb, 10mb or 1gb"),
    (["ui", "--port", "70000"], "--port 70000 is not a port number (0-65535)"),
    # each was ignored: --bench measured the champion, not --model; a serving demo dropped --requests and --out
    (["demo", "--bench", "--model", "models:/x/1", "--port", "99999"],
     "--model, --port: not for --bench, which serves --model-uri itself on 127.0.0.1 and a free port"),
    (["demo", "--requests", "5", "--out", "x.json", "--no-gradcam", "--port", "99999"],
     "--requests, --no-gradcam, --out: for --bench only (--model chooses what the app serves)"),
    (["evaluate", "models:/nothing-here/1", "--batch-size", "0"], "--batch-size 0: give at least 1 image"),
    # an --out that cannot be written failed after the whole evaluation (and skipped --log); export's named its temp file
    (["evaluate", "models:/nothing-here/1", "--out", "/"], "--out / is a folder: give a file name"),
    (["predict", "models:/nothing-here/1", "x.png", "--out", "/proc/x/y.json"], "--out /proc/x/y.json: cannot make its folder (No such file or directory)"),
    (["export", "models:/nothing-here/1", "--format", "onnx", "--out", "/"], "--out / is a folder: give a file name"),
    # both benchmarks found a bad --out only after measuring for minutes
    (["bench", "--out", "/", "--data", "/nonexistent/missing.zip"], "--out / is a folder: give a file name"),
    (["demo", "--bench", "--out", "/", "--model-uri", "models:/nothing-here/1"], "--out / is a folder: give a file name"),
    # the one word was taken for the PATH and the champion was looked for instead
    (["predict", "nothing-here/1"], "nothing-here/1 names a model: give the images to classify after it (reslab predict MODEL PATH ...)"),
    (["export", "models:/nothing-here/1", "--format", "onnx", "--tolerance", "nan"],
     "--tolerance nan: give the largest acceptable logit difference, 0 or more"),  # NaN turned the check off
    # these two were a TypeError and a RuntimeError from inside a started (then FAILED) MLflow run
    (["train", "--dataset", "fer2013", "--shortcut", "B"], "--shortcut: resnet9 has no such option (it takes: width); "
     "shortcuts are the CIFAR ResNets' option (resnet20 ... resnet110)"),
    (["tune", "--model", "resnet18", "--shortcut", "A"], "--shortcut: resnet18 has no such option (it takes: small_input); "
     "shortcuts are the CIFAR ResNets' option (resnet20 ... resnet110)"),
    (["train", "--device", "foo"], "--device 'foo': choose auto, cpu or cuda[:N]"),
    # --epochs was dropped without a word (and logged as the run's epochs)
    (["train", "--epochs", "1", "--time-budget", "25s"],
     "--time-budget fits the number of epochs to the measured speed: leave out --epochs (--max-steps caps it)"),
    (["tune", "--device", "mps"], "--device 'mps': reslab trains on auto, cpu or cuda[:N]"),
    (["train", "--min-budget-epochs", "6"],
     "--min-budget-epochs narrows the network to fit a time budget: give --time-budget (or a recipe with one)"),
    (["train", "--time-budget", "1m", "--min-budget-epochs", "-1"],
     "--min-budget-epochs takes a whole number of epochs, 0 (off) or more, not -1"),
    (["tune", "--budget", "2m", "--min-budget-epochs", "5"],
     "--min-budget-epochs is for `reslab train --time-budget`: tune sizes its trials, and --budget its refits, itself"),
])
def test_other_commands_bad_values_are_one_line(capsys, mlflow_store, tmp_path, args, line):
    """Once a traceback (an unknown storage scheme, zero rounds, the UI's port out of range from the MLflow
    server's process), a run or a server that started anyway, an unclear message, or a study that ran to say no
    trial completed. Each case carries a second fault checked later (missing data, an unknown pipeline, a bad
    port, a model not in the registry), so a check that is missing shows as that error instead of a hang; the
    UI's is the exception: without its check the MLflow server's process fails on its own."""
    if args[0] in ("tune", "train"):
        args = [*args, "--data", str(tmp_path / "missing.zip")]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"reslab: error: {line}"]


@pytest.mark.parametrize("command, flags", [
    ("train", ["--time-budget", "--recipe", "--resume", "--register", "--list-models", "--tta [LEVEL]", "--patience", "--restore-best", "--whiten", "--flip"]),
    ("tune", ["--budget", "--preset", "--pruner", "--space", "--storage", "--refit"]),
    ("demo", ["--model", "--port", "--host", "--threads", "--bench", "--concurrent"]),
    ("bench", ["--dataset"]),
    ("ui", ["--port"]),
    ("results", ["export", "docs"]),
])
def test_every_command_explains_itself(capsys, command, flags):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: reslab {command}")
    assert all(f in out for f in flags), [f for f in flags if f not in out]


@pytest.mark.parametrize("capability, precision", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_a_gpu_is_bf16_only_where_its_tensor_cores_run_it(monkeypatch, capability, precision):
    """--precision auto on CUDA: torch.cuda.is_bf16_supported() also says yes on a T4 or V100, which emulate
    bf16 slowly; those get fp16 and its gradient scaler. The device's capability is what decides (a GPU
    machine runs this for real in the CUDA tests; here the capability is given)."""
    from train.engine import resolve_precision

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision("auto", torch.device("cuda:1")) == precision
    assert asked == [torch.device("cuda:1")]  # the chosen device's, not the current one's
    assert resolve_precision("fp32", torch.device("cuda:1")) == "fp32"
