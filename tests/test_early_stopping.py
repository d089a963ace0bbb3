"""Early stopping (--patience) and the best epoch's weights (--restore-best), on real CIFAR-10 images.

Two learning-rate schedules make the validation curve's shape certain without faking anything: the
``step`` schedule with ``gamma`` 0 sets the lr to exactly 0 after two epochs (the weights stop changing,
so validation accuracy stops improving), and with ``gamma`` 40 the last epoch runs at 40x the lr, which
wrecks what the network had learnt (its validation accuracy falls to about chance).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from train.cli import main
from train.config import TrainConfig
from train.data import split_indices
from train.engine import Runtime, evaluate, fit, load_checkpoint
from train.models import create_model

TINY = {"dataset": "cifar10", "model": "resnet9", "model_args": {"width": 8}, "subset": 800, "val_fraction": 0.25,
        "batch_size": 32, "lr": 0.05, "schedule": "step", "seed": 1, "evaluate_test": False, "progress": False}
FROZEN = {"epochs": 10, "milestones": [0.2], "gamma": 0.0}  # lr exactly 0 from epoch 3 on: a plateau
COLLAPSE = {"epochs": 4, "milestones": [0.75], "gamma": 40.0}  # the last epoch at 40x the lr: worse than the best


class StopAfter(Exception):
    """Raised by a callback to interrupt training at a chosen epoch."""


def train_cli(tmp_path: Path, data_dir: Path, config: dict, *flags: str) -> mlflow.entities.Run:
    """``reslab train`` with ``config`` as its --config file (the network's width has no flag); its one run."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(["train", "--data", str(data_dir), "--config", str(tmp_path / "run.yaml"), "--checkpoint-dir",
          str(tmp_path / "ck"), *flags])
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id])
    return run


def val_accs(run_id: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "val_acc"), key=lambda m: m.step)]


def test_patience_stops_the_run_and_mlflow_shows_where(mlflow_store, data_dir, tmp_path, capsys):
    run = train_cli(tmp_path, data_dir, {**TINY, **FROZEN, "progress": True}, "--patience", "2")
    m, t, p = run.data.metrics, run.data.tags, run.data.params
    accs = val_accs(run.info.run_id)
    best_epoch = accs.index(max(accs)) + 1  # the first epoch with the best accuracy
    assert len(accs) < FROZEN["epochs"], accs  # stopped before its last epoch
    assert len(accs) == best_epoch + 2 and max(accs[best_epoch:]) <= accs[best_epoch - 1], accs  # 2 epochs without a gain
    assert m["stopped_epoch"] == m["epochs_run"] == len(accs) and m["best_epoch"] == best_epoch
    assert m["best_val_acc"] == pytest.approx(max(accs)) and m["model_epoch"] == len(accs)  # no --restore-best: the last
    assert t["early_stopped"] == "true" and p["patience"] == "2" and p["restore_best"] == "False"
    assert m["final_val_acc"] == pytest.approx(accs[-1])
    out = capsys.readouterr().out
    assert f"early stop: val_acc has not improved for 2 epochs (best {max(accs):.4f} at epoch {best_epoch})" in out
    assert f"stopped early after epoch {len(accs)}: no better validation accuracy for 2 epochs" in out


def test_restore_best_logs_the_best_epochs_weights_not_the_last(mlflow_store, data_dir, cifar, tmp_path):
    run = train_cli(tmp_path, data_dir, {**TINY, **COLLAPSE, "evaluate_test": True}, "--restore-best", "--no-progress")
    m = run.data.metrics
    accs = val_accs(run.info.run_id)
    assert len(accs) == COLLAPSE["epochs"] and accs[-1] < max(accs) - 0.05, accs  # the setting: the last epoch is worse
    best_epoch = accs.index(max(accs)) + 1
    assert m["best_epoch"] == m["model_epoch"] == best_epoch and "stopped_epoch" not in m
    assert "early_stopped" not in run.data.tags  # no --patience: nothing to say about stopping
    assert m["final_val_acc"] == pytest.approx(max(accs), abs=1e-7)

    # the logged model's own weights, evaluated as training evaluated: the best epoch's accuracy, on val and test
    from train.tracking import rebuild_module

    logged, _ = rebuild_module(f"runs:/{run.info.run_id}/model")
    rt = Runtime(torch.device("cpu"), run.data.tags["precision"], True, torch.tensor(cifar.mean), torch.tensor(cifar.std))
    _, val_idx = split_indices(cifar.train_y, TINY["subset"], TINY["val_fraction"], TINY["seed"])
    x_val, y_val = cifar.train_x[val_idx], cifar.train_y[val_idx]
    assert evaluate(rt.place(logged), x_val, y_val, rt).accuracy == pytest.approx(max(accs), abs=1e-7)
    last = create_model("resnet9", 10, 3, width=8)
    last.load_state_dict(load_checkpoint(tmp_path / "ck")["model"])  # the last epoch's weights, from last.pt
    assert evaluate(rt.place(last), x_val, y_val, rt).accuracy == pytest.approx(accs[-1], abs=1e-7)
    test_acc = evaluate(logged, cifar.test_x, cifar.test_y, rt).accuracy
    assert m["test_acc"] == pytest.approx(test_acc, abs=1e-7)  # the test split saw the restored weights
    assert abs(test_acc - evaluate(last, cifar.test_x, cifar.test_y, rt).accuracy) > 0.03


def test_a_resumed_run_stops_and_restores_as_an_uninterrupted_one(cifar, tmp_path):
    """Interrupted one epoch after its best (the patience counter at 1) and resumed: the same stop epoch,
    best epoch and restored (EMA) weights. Resumed again from the checkpoint of the epoch it stopped at (a
    run killed during its final evaluation), it trains no further and ends the same."""
    cfg = {**TINY, **FROZEN, "patience": 2, "restore_best": True, "ema": 0.9}
    full = fit(TrainConfig(**cfg, checkpoint_dir=str(tmp_path / "full")), cifar)
    s = full.extra["stopping"]
    assert s["stopped_epoch"] == s["best_epoch"] + 2 < FROZEN["epochs"] and s["model_epoch"] == s["best_epoch"], s
    assert full.val.accuracy == pytest.approx(s["best_val_acc"], abs=1e-7)

    def interrupt(epoch: int, metrics: dict[str, float]) -> None:
        if epoch + 1 == s["best_epoch"] + 1:
            raise StopAfter

    part = TrainConfig(**cfg, checkpoint_dir=str(tmp_path / "part"))
    with pytest.raises(StopAfter):
        fit(part, cifar, callbacks=[interrupt])
    assert load_checkpoint(tmp_path / "part")["best"]["since_best"] == 1
    for name in ("resumed mid-way", "resumed after stopping"):
        resumed = fit(part, cifar, resume=tmp_path / "part")
        assert resumed.extra["stopping"] == s, name
        assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in full.history], name
        for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
            assert torch.equal(a, b), (name, k)
        assert load_checkpoint(tmp_path / "part")["epoch"] == s["stopped_epoch"], name


NEEDS_VAL = "judges validation accuracy, so it needs a validation split (--val-fraction above 0, got 0.0)"


@pytest.mark.parametrize("flags, message", [
    (["--patience", "0"], "--patience must be a whole number of epochs, at least 1 (got 0)"),
    (["--patience", "3", "--val-fraction", "0"], f"--patience {NEEDS_VAL}"),
    (["--restore-best", "--val-fraction", "0"], f"--restore-best {NEEDS_VAL}"),
])
def test_bad_stopping_flags_are_one_line(in_process, tmp_path, flags, message):
    out = in_process(["train", "--data", str(tmp_path / "never-read.zip"), *flags], tmp_path / "mlruns")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"reslab: error: {message}"]


def test_the_library_raises_where_the_cli_exits(cifar):
    with pytest.raises(ValueError, match="leaves no validation images"):
        fit(TrainConfig(**{**TINY, "subset": 10, "val_fraction": 0.01, "epochs": 1, "patience": 1}), cifar)


@pytest.mark.parametrize("command", ["train", "tune"])
def test_help_explains_the_flags(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--patience N stop early when validation accuracy has not improved for N epochs (default: off)" in out
    assert "--restore-best end with the weights of the epoch with the best validation accuracy" in out


def test_a_tune_refit_has_no_validation_split_to_stop_on():
    """``reslab tune --refit --patience N``: the refit trains on train + validation, so it must not stop early."""
    from train.stopping import check
    from tune.finalize import refit_config

    cfg = refit_config(TrainConfig(patience=3, restore_best=True), None, False)
    assert cfg.val_fraction == 0 and cfg.patience is None and not cfg.restore_best
    check(cfg)  # what fit checks first: no ValueError
