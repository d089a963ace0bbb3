"""Patch-whitening initialisation of a network's first convolution (``--whiten``).

The first layer of the fast-CIFAR lineage (Page 2018; tysam-code 2023; airbench, Jordan 2024) starts as
a whitening transform of the training images' patches: its filters are the eigenvectors of the patch
covariance, each divided by the square root of its eigenvalue, so their outputs are decorrelated with unit
variance from the first step; the negated filters come next, so that the activation after them passes
both signs. airbench keeps that layer fixed, and so does this: short runs then spend no steps learning
what a covariance matrix already says.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_IMAGES = 2000  # patches of this many training images estimate the covariance (seeded, so repeatable)
CHUNK_IMAGES = 250  # images unfolded into patches at a time
EPS = 5e-4  # added to each eigenvalue: keeps the near-zero directions (noise) from being blown up


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The network's first convolution, in module order (its stem)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("--whiten needs a network that starts with a convolution")
    return conv


def patch_whitening(images: np.ndarray, mean: list[float], std: list[float], kernel: tuple[int, int],
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (rows, shaped as conv filters) of the covariance of the
    ``kernel``-sized patches of ``images`` (N, H, W, C uint8), normalised as training normalises them."""
    pick = np.sort(np.random.default_rng(seed).permutation(len(images))[:SAMPLE_IMAGES])
    channels = images.shape[-1]
    shift = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    scale = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    dim = channels * kernel[0] * kernel[1]
    cov, count = torch.zeros(dim, dim, dtype=torch.float64), 0
    for start in range(0, len(pick), CHUNK_IMAGES):  # all patches at once would hold ~0.4 GB (2,000 CIFAR images)
        x = (torch.from_numpy(images[pick[start:start + CHUNK_IMAGES]]).permute(0, 3, 1, 2).double() / 255 - shift) / scale
        patches = F.unfold(x, kernel).transpose(1, 2).reshape(-1, dim)
        cov += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov / count)  # ascending
    order = eigenvalues.argsort(descending=True)
    return eigenvalues[order], eigenvectors.T[order].reshape(-1, channels, *kernel)


@torch.no_grad()
def whiten_first_conv(model: nn.Module, images: np.ndarray, mean: list[float], std: list[float],
                      seed: int = 0) -> int:
    """Set the first convolution's filters to +/- the whitening filters of the images' patches (strongest
    directions first) and freeze them; filters beyond twice the patch size keep their random start. Returns
    how many filters were set."""
    conv = first_conv(model)
    if conv.groups != 1 or conv.in_channels != images.shape[-1]:
        raise ValueError(f"--whiten: the first convolution takes {conv.in_channels} channels, the images have {images.shape[-1]}")
    eigenvalues, filters = patch_whitening(images, mean, std, conv.kernel_size, seed)
    pairs = min(len(eigenvalues), conv.out_channels // 2)
    w = filters[:pairs] / torch.sqrt(eigenvalues[:pairs] + EPS).view(-1, 1, 1, 1)
    conv.weight[: 2 * pairs] = torch.cat([w, -w]).to(conv.weight.dtype)
    conv.weight.requires_grad_(False)
    return 2 * pairs
