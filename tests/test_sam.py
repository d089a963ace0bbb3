"""``--sam RHO``: sharpness-aware minimisation in the shared training step (train/engine.py: Stepper)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import train.engine
from train.config import TrainConfig
from train.engine import fit, make_stepper


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(dataset="cifar10", model="resnet20", lr=0.1, batch_size=8, weight_decay=0.0, schedule="constant",
                       momentum=0.0, nesterov=False, **kw).resolved()


def test_the_step_follows_the_gradient_taken_at_the_perturbed_weights():
    """One SGD step with --sam 0.05 equals SAM written out: the gradient g at w, then the gradient at
    w + 0.05 g / |g|, applied at w. BatchNorm's running statistics are those of the first pass only."""
    model = _small_net()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3] * 2)
    make_stepper(_cfg(sam=0.05), model, 10, torch.device("cpu"), "fp32")(x, y)

    crit = nn.CrossEntropyLoss()
    g = torch.autograd.grad(crit(ref(x), y), list(ref.parameters()))  # updates ref's running stats once
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for p, t in zip(moved.parameters(), g):
            p.add_(0.05 * t / norm)
    g_sam = torch.autograd.grad(crit(moved(x), y), list(moved.parameters()))
    with torch.no_grad():
        for p, t in zip(ref.parameters(), g_sam):
            p.sub_(0.1 * t)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for b, c in zip(model.buffers(), ref.buffers()):
        assert torch.equal(b, c)

    plain = _small_net()  # and it is not the plain step
    make_stepper(_cfg(), plain, 10, torch.device("cpu"), "fp32")(x, y)
    assert max((p - q).abs().max().item() for p, q in zip(plain.parameters(), model.parameters())) > 1e-4


def test_a_step_the_scaler_skips_leaves_the_weights_exactly_as_they_were():
    """fp16's loss scale can overflow the gradients while the loss is finite; the scaler then skips the step.
    The perturbed weights must be put back exactly (an inf gradient makes w + e - e a NaN)."""
    model = _small_net()
    before = copy.deepcopy(model)
    stepper = make_stepper(_cfg(sam=0.05), model, 10, torch.device("cpu"), "fp32")
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=1e37, enabled=True)
    x, y = 1e4 * torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3] * 2)
    stepper(x, y)
    assert stepper.scaler.get_scale() < 1e37  # it saw the overflow and backed off
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)  # skipped step: the weights are exactly as they were


def test_a_run_with_sam_takes_two_passes_a_step_and_learns(cifar, monkeypatch):
    """Two forward-backward passes per step through the training loop, and a network that learns: CIFAR-10, whose
    largest class is a tenth of the validation split, where a FER-2013 run's bar of 1/7 was below the 25% that
    always answering 'happy' scores."""
    passes, steps = [], []
    call = train.engine.Stepper._loss
    step = train.engine.Stepper.__call__

    def counting_loss(self, x, y):
        passes.append(1)
        return call(self, x, y)

    def counting_step(self, x, y, where=""):
        steps.append(1)
        return step(self, x, y, where)

    monkeypatch.setattr(train.engine.Stepper, "_loss", counting_loss)
    monkeypatch.setattr(train.engine.Stepper, "__call__", counting_step)
    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 16}, subset=1200, epochs=2,
                      batch_size=64, lr=0.05, sam=0.05, evaluate_test=False, progress=False, seed=1)
    result = fit(cfg, cifar)
    assert steps and len(passes) == 2 * len(steps)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    majority = np.bincount(result.val.labels).max() / len(result.val.labels)
    assert result.history[-1]["val_acc"] > 2 * majority, (result.history[-1]["val_acc"], majority)


def test_a_bad_radius_is_one_error():
    with pytest.raises(ValueError, match="--sam takes a radius above 0"):
        TrainConfig(dataset="fer2013", sam=-0.1).resolved()
    from train.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--dataset", "fer2013", "--recipe", "fast-cpu", "--sam", "0.1"])
    assert config_from_args(args).sam == 0.1
