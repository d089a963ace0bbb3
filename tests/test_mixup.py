"""``--mixup ALPHA``: training images blended in pairs with their labels, at a Beta(alpha, alpha) weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import train.engine
from train.augment import mixup
from train.config import TrainConfig
from train.engine import BatchAugment, batch_augment, fit


def _draw(alpha: float, gen: torch.Generator, n: int = 64) -> tuple[float, np.ndarray, torch.Tensor, torch.Tensor]:
    """One mixup of a batch whose image i is filled with the value i and whose label is i: the weight and the
    partners can then be read off the targets, and the images checked against them."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    mixed, target = mixup(x, torch.arange(n), alpha, n, gen)
    assert target.shape == (n, n) and torch.allclose(target.sum(1), torch.ones(n))
    assert ((target > 0).sum(1) <= 2).all()  # itself and one partner
    partner = np.array([next((j for j in np.flatnonzero(row) if j != i), i) for i, row in enumerate(target.numpy())])
    assert sorted(partner) == list(range(n))  # the partners are a permutation of the batch
    moved = np.flatnonzero(partner != np.arange(n))
    assert len(moved) > n // 2
    return float(target[moved[0], moved[0]]), partner, mixed, target


def test_images_and_labels_are_blended_with_one_partner_at_the_same_weight():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        lam, partner, mixed, target = _draw(0.4, gen)
        n = len(partner)
        expected = lam * torch.arange(n, dtype=torch.float32) + (1 - lam) * torch.from_numpy(partner).float()
        assert torch.allclose(mixed[:, 0, 0, 0], expected, atol=1e-4)  # each image: lam of itself, 1 - lam of its partner
        assert torch.equal(mixed, mixed[:, :1, :1, :1].expand_as(mixed))  # the whole image alike, every channel
        moved = partner != np.arange(n)
        assert torch.allclose(target[np.flatnonzero(moved), np.flatnonzero(moved)], torch.tensor(lam))


def test_the_weight_follows_beta_alpha_alpha_and_the_generator_decides_it():
    gen = torch.Generator().manual_seed(0)
    lams = [_draw(0.2, gen, n=16)[0] for _ in range(300)]
    assert stats.kstest(lams, stats.beta(0.2, 0.2).cdf).pvalue > 0.001  # mostly near 0 or 1 at alpha 0.2
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 1e-6  # and not uniform
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 7, (32,))
    assert all(torch.equal(p, q) for p, q in zip(mixup(x, y, 0.3, 7, a), mixup(x, y, 0.3, 7, b)))  # resume mixes alike


def test_a_fer2013_run_with_mixup_trains_on_blended_pairs_and_learns(fer, monkeypatch):
    """A short real FER-2013 run with --mixup 0.4: every training step gets soft targets that blend two classes
    (rows summing to one), and the training loss falls."""
    targets: list[torch.Tensor] = []
    step = train.engine.Stepper.__call__

    def spying_step(self, x, y, where=""):
        targets.append(y.detach().clone())
        return step(self, x, y, where)

    monkeypatch.setattr(train.engine.Stepper, "__call__", spying_step)
    cfg = TrainConfig(dataset="fer2013", model="resnet9", model_args={"width": 16}, subset=1200, epochs=2,
                      batch_size=64, lr=0.05, mixup=0.4, evaluate_test=False, progress=False, seed=1)
    assert batch_augment(cfg.resolved(), 7) == BatchAugment(0, True, 0, 0.4, 7)
    result = fit(cfg, fer)
    assert targets and all(t.shape[1:] == (7,) and t.dtype == torch.float32 for t in targets)
    assert all(torch.allclose(t.sum(1), torch.ones(len(t))) for t in targets)
    blended = torch.cat(targets)
    assert ((blended > 0).sum(1) == 2).float().mean() > 0.5  # most images carry two labels (same-class pairs: one)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_a_bad_alpha_is_one_error():
    with pytest.raises(ValueError, match="--mixup takes an alpha above 0"):
        TrainConfig(dataset="fer2013", mixup=-0.2).resolved()
    with pytest.raises(ValueError, match="--mixup needs the dataset's number of classes"):
        batch_augment(TrainConfig(dataset="fer2013", mixup=0.2).resolved())
    from train.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--dataset", "fer2013", "--recipe", "fast-cpu", "--mixup", "0.3"])
    assert config_from_args(args).mixup == 0.3
