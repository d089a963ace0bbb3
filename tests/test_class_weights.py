"""``--class-weights POWER``: FER-2013's rare classes weighed up in the training loss (train/engine.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import train.engine
from train.config import TrainConfig
from train.data import split_indices
from train.engine import class_weights, fit, make_stepper


def test_power_one_gives_every_class_the_same_total_weight_on_fer2013(fer):
    counts = np.bincount(fer.train_y, minlength=fer.num_classes)
    w = class_weights(fer.train_y, fer.num_classes, 1.0).numpy()
    totals = w * counts
    np.testing.assert_allclose(totals, totals[0], rtol=1e-5)  # balanced: each class weighs as much in all
    assert (w * counts).sum() / counts.sum() == pytest.approx(1.0)  # an image weighs 1 on average
    disgust, happy = fer.classes.index("disgust"), fer.classes.index("happy")
    assert w[disgust] / w[happy] == pytest.approx(counts[happy] / counts[disgust], rel=1e-5)  # 7,215 / 436

    half = class_weights(fer.train_y, fer.num_classes, 0.5).numpy()  # half-way: the square root of that ratio
    assert half[disgust] / half[happy] == pytest.approx((counts[happy] / counts[disgust]) ** 0.5, rel=1e-5)
    assert (half * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert class_weights(fer.train_y, fer.num_classes, 0.0) is None


def test_a_class_without_training_images_gets_a_finite_weight():
    w = class_weights(np.array([0, 0, 0, 1]), 3, 1.0)
    assert torch.isfinite(w).all() and w[2] == w.max()


def test_the_step_follows_the_weighted_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    ref = copy.deepcopy(model)
    x, y = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 0, 0, 0, 1, 2])
    w = torch.tensor([0.25, 2.0, 3.0])
    cfg = TrainConfig(dataset="cifar10", model="resnet20", lr=0.1, batch_size=6, weight_decay=0.0,
                      schedule="constant", momentum=0.0, nesterov=False).resolved()
    make_stepper(cfg, model, 10, torch.device("cpu"), "fp32", weight=w)(x, y)

    losses = nn.functional.cross_entropy(ref(x), y, reduction="none")
    loss = (w[y] * losses).sum() / w[y].sum()  # written out: each image's loss times its class's weight
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p.sub_(0.1 * g)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_a_fer2013_run_trains_with_the_weights_of_its_own_training_split(fer, monkeypatch):
    seen = []
    init = train.engine.Stepper.__init__

    def spying_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.criterion.weight)

    monkeypatch.setattr(train.engine.Stepper, "__init__", spying_init)
    cfg = TrainConfig(dataset="fer2013", model="resnet9", model_args={"width": 16}, subset=1400, epochs=1,
                      batch_size=64, lr=0.05, class_weights=0.5, evaluate_test=False, progress=False, seed=3)
    result = fit(cfg, fer)
    train_idx, _ = split_indices(fer.train_y, cfg.subset, cfg.resolved().val_fraction, cfg.seed)
    expected = class_weights(fer.train_y[train_idx], fer.num_classes, 0.5)
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(seen[0], expected)
    assert np.isfinite(result.history[-1]["train_loss"])


def test_a_bad_power_is_one_error():
    with pytest.raises(ValueError, match="--class-weights takes a power from 0"):
        TrainConfig(dataset="fer2013", class_weights=1.5).resolved()
    from train.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--dataset", "fer2013", "--recipe", "fast-cpu", "--class-weights", "0.5"])
    assert config_from_args(args).class_weights == 0.5
