"""The registry reads like the papers' tables: parameter counts, shapes, shortcuts."""

from __future__ import annotations

import pytest
import torch

from train.models import CIFAR_DEPTHS, count_parameters, create_model, list_models

# He et al. 2015, Table 6: parameters of the CIFAR-10 ResNets (in millions, as printed).
PAPER_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
def test_cifar_resnets_match_the_paper_table(depth):
    n = count_parameters(create_model(f"resnet{depth}", 10, 3))
    assert round(n / 1e6, 2 if depth < 100 else 1) == PAPER_PARAMS[depth]
    # option A shortcuts add no parameters, so the plain twin has exactly as many
    assert count_parameters(create_model(f"plain{depth}", 10, 3)) == n


def test_option_b_projection_adds_parameters():
    a = count_parameters(create_model("resnet20", 10, 3))
    b = count_parameters(create_model("resnet20", 10, 3, shortcut="B"))
    assert b > a


def test_plain_networks_have_no_shortcuts():
    plain = create_model("plain20", 10, 3)
    assert all(block.shortcut is None for stage in plain.layers for block in stage)
    res = create_model("resnet20", 10, 3)
    assert all(block.shortcut is not None for stage in res.layers for block in stage)


def test_registry_lists_every_family():
    names = set(list_models())
    for d in CIFAR_DEPTHS:
        assert {f"resnet{d}", f"plain{d}", f"resnet{d}v2"} <= names
    for d in (18, 34, 50, 101, 152):
        assert {f"resnet{d}", f"resnet{d}v2"} <= names


# one of each block kind: basic, plain, pre-activation basic, torchvision basic and bottleneck,
# pre-activation bottleneck, wide/shallow
@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet20v2", "resnet18", "resnet50", "resnet50v2", "resnet9",
                                  "airbench"])
def test_every_model_classifies_small_colour_and_grayscale_images(name):
    torch.manual_seed(0)
    for channels, size, classes in ((3, 32, 10), (1, 48, 7)):
        model = create_model(name, classes, channels).eval()
        with torch.no_grad():
            out = model(torch.randn(2, channels, size, size))
            feats = model.features(torch.randn(1, channels, size, size))
        assert out.shape == (2, classes) and torch.isfinite(out).all()
        assert feats.ndim == 4  # the last residual stage, for Grad-CAM


def test_grayscale_is_handled_by_in_channels_not_copies():
    m = create_model("resnet18", 7, 1)
    assert m.net.conv1.in_channels == 1 and m.net.conv1.kernel_size == (3, 3)
    assert isinstance(m.net.maxpool, torch.nn.Identity)  # small-image stem


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet7'"):
        create_model("resnet7")
