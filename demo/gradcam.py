"""Grad-CAM (Selvaraju et al. 2017) on the last residual stage: where the network looked.

It needs the network as an ``nn.Module`` with gradients, which the exported pt2 graph is not, so
the demo rebuilds the module from the logged safetensors weights (``demo.serving.safe_module``).
Every reslab model exposes ``features(x)`` and computes ``forward`` through it: the trunk runs once,
and the head is run on its output by wrapping that method on the instance for one call, so the
prediction and the heatmap come from the same pass.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_lock = threading.Lock()  # the instance-level wrap below must not interleave between threads


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> np.ndarray:
    """Heatmaps in [0, 1], shape (N, H, W) at the input's resolution, for class ``target``
    (default: each image's predicted class)."""
    return forward_with_cam(model, x, list(range(len(x))), target)[1]


def forward_with_cam(model: nn.Module, x: torch.Tensor, rows: list[int],
                     target: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The logits of every image in ``x`` and the Grad-CAM heatmaps of ``rows`` (for ``target``, one
    class per row; default: the predicted one), from one pass through the network.

    Grad-CAM needs the class score's gradient with respect to the feature map, and nothing before the
    feature map: so the trunk runs once without autograd, its output becomes a leaf, and only the head
    (pooling and classifier) is run with gradients and differentiated. Differentiating the whole
    network, as a second forward and backward pass did, cost about three forward passes per request."""
    def features(inp: torch.Tensor) -> torch.Tensor:  # the head runs on the leaf, not on a new trunk pass
        return leaf

    with _lock:  # another thread's wrap must be neither read as the trunk nor replaced mid-call
        with torch.no_grad():
            fmap = model.features(x)
        leaf = fmap.detach().requires_grad_(bool(rows))
        with torch.enable_grad():
            model.features = features  # type: ignore[method-assign]
            try:
                logits = model(x)
            finally:
                del model.features
            if not rows:
                return logits.detach(), np.zeros((0, *x.shape[-2:]), np.float32)
            picked = torch.as_tensor(rows)
            target = logits[picked].argmax(1) if target is None else target
            logits[picked].gather(1, target.view(-1, 1)).sum().backward()
    fmap, grad = leaf.detach()[picked], leaf.grad[picked]
    weights = grad.mean(dim=(2, 3), keepdim=True)  # global-average-pooled gradients per channel
    cam = F.relu((weights * fmap).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    return logits.detach(), ((cam - lo) / (hi - lo).clamp_min(1e-8)).numpy()


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a JET-coloured heatmap over ``rgb`` (resized to the image)."""
    heat = cv2.resize(cam.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC)
    colour = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
    return np.uint8(np.clip((1 - alpha) * rgb + alpha * colour, 0, 255))
