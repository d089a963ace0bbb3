"""Grad-CAM shows where the network's evidence is: checked on a network whose evidence is known, against
an independent computation on a real ResNet, and switched off (with a reason) where it would lie."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from demo.gradcam import grad_cam
from demo.serving import gradcam_problem
from train.models import create_model


class Corners(nn.Module):
    """Class 0's evidence is the top-left quadrant, class 1's the bottom-right: ``features`` keeps each
    quadrant in its own channel and each logit averages one channel."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(2, 8, 8)
        mask[0, :4, :4] = 1
        mask[1, 4:, 4:] = 1
        self.register_buffer("mask", mask)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask  # (N, 2, 8, 8) from a one-channel (N, 1, 8, 8) input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def test_heat_lies_where_the_evidence_is_and_follows_the_class():
    x = torch.ones(1, 1, 8, 8)
    top_left = grad_cam(Corners(), x, torch.tensor([0]))[0]
    bottom_right = grad_cam(Corners(), x, torch.tensor([1]))[0]
    expect = np.zeros((8, 8), np.float32)
    expect[:4, :4] = 1
    np.testing.assert_allclose(top_left, expect, atol=1e-6)
    np.testing.assert_allclose(bottom_right, expect[::-1, ::-1], atol=1e-6)


def independent_grad_cam(model: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM from a forward hook on the last stage's activation and autograd.grad, nothing shared
    with demo/gradcam.py: ReLU(sum_k mean(dy/dA_k) A_k), upsampled, scaled to [0, 1]."""
    store = {}
    handle = model.final_act.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = store["a"]
    (g,) = torch.autograd.grad(logits[0, target], a)
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min()).clamp_min(1e-8)
    return cam.detach().numpy()


def test_matches_an_independent_computation_on_a_resnet(cifar):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 3).eval()
    x = (torch.from_numpy(cifar.test_x[:1]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    maps = {c: grad_cam(model, x, torch.tensor([c]))[0] for c in (0, 3)}
    for c, m in maps.items():
        np.testing.assert_allclose(m, independent_grad_cam(model, x, c), atol=1e-4)
        assert m.shape == (32, 32) and m.max() == pytest.approx(1.0) and m.min() == pytest.approx(0.0)
    assert np.abs(maps[0] - maps[3]).max() > 0.1  # another class, another map


def test_a_network_without_a_feature_stage_turns_grad_cam_off():
    """The demo serves the very module it rebuilds from the safetensors weights (no second, exported
    graph that could disagree with it), so Grad-CAM is off only for a network it cannot hook: one
    without the ``features`` stage every reslab network has. That case is named, not a traceback."""
    assert gradcam_problem(create_model("resnet20", 10, 3).eval()) is None
    assert gradcam_problem(create_model("resnet9", 7, 1, width=32).eval()) is None
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    assert gradcam_problem(flat) == "the network has no features() stage"
