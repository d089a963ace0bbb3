"""``--crop-size N``: train on random NxN crops (cheaper steps, a FER-2013 habit), evaluate whole images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import train.engine
from train.augment import random_crop_flip
from train.config import TrainConfig
from train.engine import BatchAugment, batch_augment, fit

from tests.test_train import StopAfter


def _window(crop: np.ndarray, image: np.ndarray) -> tuple[int, int, bool] | None:
    """Where ``crop`` lies in ``image`` (or in its mirror): (dy, dx, mirrored), or None."""
    size = crop.shape[0]
    for mirrored, src in ((False, image), (True, image[:, ::-1])):
        for dy in range(image.shape[0] - size + 1):
            for dx in range(image.shape[1] - size + 1):
                if np.array_equal(src[dy:dy + size, dx:dx + size], crop):
                    return dy, dx, mirrored
    return None


def test_random_crops_are_windows_of_the_image_at_many_offsets(fer):
    x = fer.train_x[:96]
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(torch.from_numpy(x), 0, True, gen, size=40).numpy()
    assert out.shape == (96, 40, 40, 1)
    where = [_window(c, img) for c, img in zip(out, x)]
    assert all(w is not None for w in where)  # every crop is a 40x40 window of its own image, maybe mirrored
    assert len({(dy, dx) for dy, dx, _ in where}) > 30  # offsets spread over the 9x9 possible ones
    assert 20 < sum(m for *_, m in where) < 76  # about half mirrored
    with pytest.raises(ValueError, match="a 50x50 crop does not fit 48x48 images padded by 0"):
        random_crop_flip(torch.from_numpy(x), 0, False, gen, size=50)


def test_training_sees_crops_and_evaluation_whole_images(fer, monkeypatch):
    """A short real run on FER-2013 with --crop-size 40: every training batch is 40x40, every evaluated one
    48x48 (validation and test), and it learns."""
    seen: dict[bool, set[tuple[int, int]]] = {True: set(), False: set()}
    build = train.engine.build_model

    def spying_build(cfg, data, *rest):
        model = build(cfg, data, *rest)
        model.register_forward_pre_hook(lambda m, args: seen[m.training].add(tuple(args[0].shape[-2:])))
        return model

    monkeypatch.setattr(train.engine, "build_model", spying_build)
    cfg = TrainConfig(dataset="fer2013", model="resnet9", model_args={"width": 8}, subset=1200, epochs=2,
                      batch_size=64, lr=0.05, crop_size=40, tta=1, progress=False, seed=1)
    assert batch_augment(cfg.resolved()) == BatchAugment(0, True, 40)  # FER-2013: albumentations, then crop + flip batched
    result = fit(cfg, fer)
    assert seen[True] == {(40, 40)} and seen[False] == {(48, 48)}
    assert result.test is not None and len(result.test.labels) == len(fer.test_y)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_a_crop_larger_than_the_images_is_one_error(fer, capsys):
    with pytest.raises(ValueError, match="--crop-size 56 does not fit the dataset's 48x48 images"):
        fit(TrainConfig(dataset="fer2013", subset=100, epochs=1, crop_size=56, progress=False), fer)
    with pytest.raises(ValueError, match=r"--crop-size takes 0 \(whole images\)"):
        TrainConfig(dataset="fer2013", crop_size=-4).resolved()
    from train.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--dataset", "fer2013", "--recipe", "fast-cpu", "--crop-size", "40"])
    assert config_from_args(args).crop_size == 40
    # the command line says so before anything starts (before: from inside a started MLflow run, left FAILED)
    args = build_parser().parse_args(["train", "--dataset", "cifar10", "--crop-size", "48"])
    with pytest.raises(SystemExit):
        config_from_args(args)
    assert "--crop-size 48 does not fit the dataset's 32x32 images" in capsys.readouterr().err


def test_full_size_finish_trains_the_last_steps_on_whole_images(fer, monkeypatch):
    """--full-size-finish 0.25 with --crop-size 40: the first three quarters of the training steps see 40x40
    crops, the last quarter whole 48x48 faces, in that order."""
    shapes: list[tuple[int, int]] = []
    build = train.engine.build_model

    def spying_build(cfg, data, *rest):
        model = build(cfg, data, *rest)
        def record(m, args):
            if m.training:
                shapes.append(tuple(args[0].shape[-2:]))

        model.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(train.engine, "build_model", spying_build)
    cfg = TrainConfig(dataset="fer2013", model="resnet9", model_args={"width": 8}, subset=1200, epochs=2,
                      batch_size=64, lr=0.05, crop_size=40, full_size_finish=0.25, evaluate_test=False,
                      progress=False, seed=1)
    result = fit(cfg, fer)
    steps = len(shapes)
    crops = math.ceil(0.75 * steps)  # the step that starts at 3/4 of the horizon is the first whole-image one
    assert len(result.history) == 2 and steps >= 30
    assert shapes == [(40, 40)] * crops + [(48, 48)] * (steps - crops)
    with pytest.raises(ValueError, match="--full-size-finish takes a fraction"):
        TrainConfig(dataset="fer2013", crop_size=40, full_size_finish=1.5).resolved()


def test_a_resumed_run_switches_to_whole_images_where_the_uninterrupted_one_did(fer, tmp_path):
    """Interrupted after epoch 1 of 3 with --full-size-finish 0.5 (the switch falls in epoch 2) and class
    weights on too: resumed, it ends with the same weights bit for bit."""
    def stop(epoch, metrics):
        if epoch == 0:
            raise StopAfter

    base = dict(dataset="fer2013", model="resnet9", model_args={"width": 8}, subset=900, epochs=3, batch_size=64,
                lr=0.05, crop_size=40, full_size_finish=0.5, class_weights=0.5, evaluate_test=False, progress=False,
                seed=2)
    full = fit(TrainConfig(**base, checkpoint_dir=str(tmp_path / "a")), fer)
    cut = TrainConfig(**base, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(StopAfter):
        fit(cut, fer, callbacks=[stop])
    resumed = fit(cut, fer, resume=tmp_path / "b")
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
