"""``--whiten``: the first convolution starts as a patch-whitening transform of the real training images
and stays fixed while the rest of the network trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.config import TrainConfig
from train.engine import fit
from train.models import create_model
from train.whitening import first_conv, whiten_first_conv


def test_whitened_filters_decorrelate_unseen_patches(cifar):
    """On test images (not the ones the covariance came from), the whitened filters' outputs have unit
    variance and are uncorrelated; the second half of each pair is the negation of the first."""
    model = create_model("resnet9", 10, 3, width=32)
    before = first_conv(model).weight.clone()
    assert whiten_first_conv(model, cifar.train_x, cifar.mean, cifar.std) == 32  # 16 pairs of the 27 directions
    w = first_conv(model).weight
    assert not w.requires_grad and torch.equal(w[16:], -w[:16]) and not torch.equal(w, before)

    pick = np.random.default_rng(0).permutation(len(cifar.test_x))[:500]  # the test split is sorted by class
    x = torch.from_numpy(cifar.test_x[pick]).permute(0, 3, 1, 2).double() / 255
    x = (x - torch.tensor(cifar.mean).view(1, 3, 1, 1)) / torch.tensor(cifar.std).view(1, 3, 1, 1)
    out = F.conv2d(x, w[:16].double()).permute(1, 0, 2, 3).reshape(16, -1)  # no padding: whole patches only
    cov = (out @ out.T / out.shape[1]).numpy()
    assert np.allclose(np.diag(cov), 1, atol=0.2), np.diag(cov).round(2)  # unwhitened: variances of 0.02-20
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 0.2, np.abs(off).max()


def test_whiten_with_pretrained_weights_is_refused():
    with pytest.raises(ValueError, match="choose one"):
        TrainConfig(dataset="cifar10", whiten=True, pretrained="torchvision").resolved()


def test_training_with_whiten_keeps_the_first_layer_fixed_and_learns(fer):
    """FER-2013 (grayscale: 9-pixel patches; ResNet-9 at width 16 has 16 stem filters, +/- the 8 strongest
    directions): a short run trains every layer but the whitened one, and learns."""
    cfg = TrainConfig(dataset="fer2013", model="resnet9", model_args={"width": 16}, subset=1500, epochs=2,
                      batch_size=64, lr=0.05, whiten=True, evaluate_test=False, progress=False, seed=3)
    start = create_model("resnet9", 7, 1, width=16)
    assert whiten_first_conv(start, fer.train_x, fer.mean, fer.std, cfg.seed) == 16
    result = fit(cfg, fer)
    trained = result.model.state_dict()
    assert torch.equal(trained["stem.0.weight"].float(), start.stem[0].weight.float())
    assert not torch.equal(trained["layers.0.0.weight"], start.state_dict()["layers.0.0.weight"])  # the rest trained
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_the_recipes_whitening_gives_way_to_given_weights(capsys):
    """fast-cpu whitens CIFAR-10's first layer; --pretrained/--init-from bring their own, so the recipe's
    whitening gives way, while --whiten asked for with them is one error line."""
    from train.cli import build_parser, config_from_args

    def cfg(*argv: str) -> TrainConfig:
        return config_from_args(build_parser().parse_args(["train", "--dataset", "cifar10", "--recipe", "fast-cpu", *argv]))

    assert cfg().whiten and not cfg("--no-whiten").whiten
    assert not cfg("--pretrained", "torchvision").whiten
    assert not cfg("--init-from", "models:/cifar10-resnet@champion").whiten
    with pytest.raises(SystemExit):
        cfg("--init-from", "models:/cifar10-resnet@champion", "--whiten")
    assert "choose one" in capsys.readouterr().err
