"""Augmentation: cheap ops on whole batches on the training device, heavy ones with albumentations.

Crop-with-padding and horizontal flip run as one gather over a uint8 batch (airbench's approach),
so they cost almost nothing. Per-image geometric and photometric transforms (what FER-2013 wants)
run through an albumentations pipeline on uint8 numpy batches in a background thread
(:class:`train.loader.BatchLoader`), off the training thread.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import albumentations as A


def random_crop_flip(
    x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None, size: int = 0
) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip for an NHWC uint8 batch.

    The crop is ``size`` x ``size`` pixels (0: the image's own size, i.e. a shift by up to ``pad``).
    Returns NHWC; one advanced-indexing gather does both, with no per-image Python loop.
    """
    n, h0, w0, _ = x.shape
    h, w = (size, size) if size else (h0, w0)
    if h > h0 + 2 * pad or w > w0 + 2 * pad:
        raise ValueError(f"a {h}x{w} crop does not fit {h0}x{w0} images padded by {pad}")
    dev = x.device
    if pad:
        x = F.pad(x, (0, 0, pad, pad, pad, pad))
    dy = torch.randint(0, h0 + 2 * pad - h + 1, (n, 1), generator=generator).to(dev)
    dx = torch.randint(0, w0 + 2 * pad - w + 1, (n, 1), generator=generator).to(dev)
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    cols = ar_w.expand(n, w)
    if flip:
        mirrored = torch.rand(n, 1, generator=generator).to(dev) < 0.5
        cols = torch.where(mirrored, (w - 1) - ar_w, ar_w)
    iy = (dy + ar_h)[:, :, None]
    ix = (dx + cols)[:, None, :]
    return x[torch.arange(n, device=dev)[:, None, None], iy, ix]


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, classes: int,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """mixup (Zhang et al., 2018) on a normalised float batch: every image blended with another image of the
    batch at one weight lam ~ Beta(alpha, alpha), the one-hot labels blended alike. Returns the blended batch and
    its soft targets (N x classes), which the cross-entropy takes as class probabilities. The weight and the
    partners come from ``generator``, so a resumed epoch mixes the same way."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(y), generator=generator).to(x.device)
    mixed = x.mul(lam).add_(x[perm], alpha=1 - lam)
    target = F.one_hot(y, classes).float()
    return mixed, target.mul(lam).add_(target[perm], alpha=1 - lam)


def album_pipeline(channels: int, strength: float = 1.0) -> A.Compose:
    """Per-image pipeline for faces; ``strength`` scales every magnitude (0 turns it off).

    albumentations and OpenCV load here, not with the module: ~0.45 s that every ``reslab`` process (and every
    served model) would pay otherwise, though only the ``album`` augmentation uses them."""
    # albumentations asks PyPI for a newer version at every import (every CLI start, every worker process):
    # a network call a training tool should not make, and a warning on offline machines. Users can still opt in.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    cv2.setNumThreads(1)  # the loader threads parallelise; OpenCV's own pool would oversubscribe 2 cores
    s = float(strength)
    return A.Compose(
        [
            A.Affine(
                rotate=(-15 * s, 15 * s),
                translate_percent=(-0.1 * s, 0.1 * s),
                scale=(1 - 0.1 * s, 1 + 0.1 * s),
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.8 if s else 0.0,
            ),
            A.RandomBrightnessContrast(0.25 * s, 0.25 * s, p=0.5 if s else 0.0),
            A.CoarseDropout(
                num_holes_range=(1, 1), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.3),
                fill=0, p=0.4 if s else 0.0,
            ),
        ]
    )


def apply_album(pipeline: A.Compose, batch: np.ndarray, seed: int) -> np.ndarray:
    """Apply a pipeline image by image to an NHWC uint8 batch, reproducibly for a given seed."""
    pipeline.set_random_seed(seed)
    out = np.empty_like(batch)
    squeeze = batch.shape[-1] == 1
    for i, img in enumerate(batch):
        res = pipeline(image=img[..., 0] if squeeze else img)["image"]
        out[i] = res[..., None] if squeeze else res
    return out


def normalize(x_nhwc_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC -> float NCHW (channels_last memory when asked), scaled and normalised."""
    x = x_nhwc_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
