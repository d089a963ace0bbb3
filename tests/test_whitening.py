"""``--whiten``: the first convolution starts as a patch-whitening transform of the real training images
and stays fixed while the rest of the network trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.config import TrainConfig
from train.data import split_indices
from train.engine import fit
from train.models import create_model
from train.whitening import first_conv, whiten_first_conv


def training_images(cfg: TrainConfig, data) -> np.ndarray:
    """The images a run of ``cfg`` trains on: its subset of the training split less its validation part."""
    train_idx, val_idx = split_indices(data.train_y, cfg.subset, cfg.val_fraction, cfg.seed)
    assert len(val_idx) > 0 and len(train_idx) < len(data.train_y)
    return data.train_x[train_idx]


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
    directions): a short run trains every layer but the whitened one, and learns. The whitening is fitted to
    the run's own training images: not its validation images, nor the rest of the split outside --subset."""
    cfg = TrainConfig(dataset="fer2013", model="resnet9", model_args={"width": 16}, subset=1500, epochs=2,
                      batch_size=64, lr=0.05, whiten=True, evaluate_test=False, progress=False, seed=3)
    start = create_model("resnet9", 7, 1, width=16)
    assert whiten_first_conv(start, training_images(cfg, fer), fer.mean, fer.std, cfg.seed) == 16
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


def test_airbench_trains_its_bn_shifts_faster_with_the_scales_and_whitened_stem_fixed(cifar):
    """airbench's network: --whiten fills its 2x2 stem exactly (+/- all 12 directions of a colour 2x2 patch);
    --bn-bias-lr-scale gives the BatchNorm shifts their own group at that multiple of the learning rate,
    while the BN scales (frozen at 1) and the whitened stem do not move, and the network learns."""
    from train.engine import make_optimizer

    cfg = TrainConfig(dataset="cifar10", model="airbench", model_args={"width": 16}, subset=2000, epochs=2,
                      batch_size=128, lr=0.2, bn_bias_lr_scale=64, whiten=True, evaluate_test=False, progress=False,
                      seed=1).resolved()
    start = create_model("airbench", 10, 3, width=16)
    assert whiten_first_conv(start, training_images(cfg, cifar), cifar.mean, cifar.std, cfg.seed) == 24
    groups = make_optimizer(start, cfg).param_groups
    shifts = [m.bias for m in start.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [g["lr"] for g in groups] == [0.2, 0.2, 0.2 * 64] and len(shifts) == 6
    assert [id(p) for p in groups[2]["params"]] == [id(b) for b in shifts]
    assert len(make_optimizer(start, TrainConfig(lr=0.2).resolved()).param_groups) == 2  # scale 1: as before

    result = fit(cfg, cifar)
    trained, before = result.model.state_dict(), start.state_dict()
    assert torch.equal(trained["stem.0.weight"].float(), before["stem.0.weight"].float())
    norms = [k[: -len(".running_mean")] for k in trained if k.endswith(".running_mean")]
    assert len(norms) == 6 and all(torch.all(trained[f"{k}.weight"] == 1) for k in norms)  # scales frozen
    assert all(not torch.equal(trained[f"{k}.bias"], before[f"{k}.bias"]) for k in norms)  # shifts learned
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_acc"] > 0.2  # chance is 0.1 (28 steps of 128 images)
