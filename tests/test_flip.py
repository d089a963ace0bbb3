"""``--flip alternate``: each image is mirrored every other epoch (airbench), from a random half in the first."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from train.config import TrainConfig
from train.engine import BatchAugment, batch_augment, make_loader


def _seen(loader, epoch: int, x: np.ndarray) -> dict[int, bool]:
    """For every image the loader yields in ``epoch``: its index in ``x`` -> whether it came mirrored."""
    seen: dict[int, bool] = {}
    rows = {img.tobytes(): i for i, img in enumerate(x)}
    mirrors = {img[:, ::-1].tobytes(): i for i, img in enumerate(x)}
    for xb, _ in loader.epoch(epoch):
        for img in xb.numpy():
            key = img.tobytes()
            if key in rows:  # an image symmetric about its vertical axis would be in both; none is in this sample
                seen[rows[key]] = False
            else:
                seen[mirrors[key]] = True
    return seen


def test_alternating_flip_shows_each_image_both_ways_every_two_epochs(cifar):
    x, y = cifar.train_x[:600], cifar.train_y[:600]
    cfg = TrainConfig(dataset="cifar10", batch_size=50, flip="alternate", seed=5).resolved()
    assert batch_augment(cfg) == BatchAugment(4, False, 0)  # the engine crops; the loader does the flipping
    loader = make_loader(cfg, x, y, torch.device("cpu"))
    e0, e1, e2 = (_seen(loader, e, x) for e in range(3))
    assert len(e0) == len(e1) == len(e2) == 600  # every image, mirrored or not, exactly once an epoch
    assert 240 < sum(e0.values()) < 360  # about half mirrored in the first epoch
    assert all(e1[i] != e0[i] for i in e0)  # then each image the other way round
    assert e2 == e0
    resident = make_loader(cfg, x, y, torch.device("cpu"))  # what a GPU run uses, gathered on the device
    resident.resident = (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    assert _seen(resident, 1, x) == e1

    other_seed = make_loader(dataclasses.replace(cfg, seed=6), x, y, torch.device("cpu"))
    assert _seen(other_seed, 0, x) != e0  # the half comes from the seed


def test_random_flip_stays_the_default(cifar):
    cfg = TrainConfig(dataset="cifar10", batch_size=50).resolved()
    assert cfg.flip == "random" and batch_augment(cfg) == BatchAugment(4, True, 0)
    loader = make_loader(cfg, cifar.train_x[:100], cifar.train_y[:100], torch.device("cpu"))
    assert loader.flip_bits is None
    with pytest.raises(ValueError, match="--flip takes one of random, alternate"):
        TrainConfig(dataset="cifar10", flip="sometimes").resolved()
