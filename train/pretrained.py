"""Weights from elsewhere, mapped onto reslab's networks (see docs/using-models.md).

- Published CIFAR ResNet checkpoints in the common layout of CIFAR ResNet repositories
  (akamaster/pytorch_resnet_cifar10: ``{"state_dict": {"module.conv1.weight", ...}, "best_prec1"}``;
  ``conv1``/``bn1`` stem, ``layer1..3`` of BasicBlocks, ``linear`` classifier, option A shortcuts).
- torchvision's ImageNet weights, chosen by the network's own architecture, from the local cache only.
- Transfer: a 3-channel stem becomes a 1-channel one by summing its filters over colour (a grayscale
  image is R = G = B, so the summed filter gives the same response); a classifier for another class
  count is left freshly initialised.

Only tensors are read: ``torch.load(..., weights_only=True)``, never arbitrary unpickling.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .models import IMAGENET_LAYERS

# What the published checkpoints were trained on (their publisher's README; ../shared/pretrained/README.md).
PUBLISHED_MEAN = [0.485, 0.456, 0.406]
PUBLISHED_STD = [0.229, 0.224, 0.225]


class ArchitectureMismatch(ValueError):
    """The checkpoint is not the network asked for; the message says what it is."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pt/.th/.safetensors file, unwrapped from ``{"state_dict"|"model": ...}`` and
    ``nn.DataParallel``'s ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one that needs unpickling arbitrary objects
        raise ValueError(f"{path}: not a tensors-only PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def is_published_layout(state: dict[str, torch.Tensor]) -> bool:
    """The CIFAR-ResNet-repository layout: ``conv1``, ``bn1``, ``layer1..3``, ``linear``."""
    return "linear.weight" in state and "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


def published_depth(state: dict[str, torch.Tensor]) -> int:
    """6n+2 from the number of blocks per stage."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.", k))}
    return 6 * len(blocks) + 2


def map_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published CIFAR ResNet's tensors to reslab's (``models.ResNet``) names."""
    out = {}
    for k, v in state.items():
        k2 = re.sub(r"^conv1\.", "stem.0.", k)
        k2 = re.sub(r"^bn1\.", "stem.1.", k2)
        k2 = re.sub(r"^layer([1-3])\.", lambda m: f"layers.{int(m.group(1)) - 1}.", k2)
        k2 = re.sub(r"^linear\.", "fc.", k2)
        out[k2] = v
    return out


def check_same_network(mapped: dict[str, torch.Tensor], model: nn.Module, what: str, classifier_may_differ: bool = False) -> None:
    """Every tensor of ``model`` present with the same shape (the classifier and a grayscale stem
    excepted for transfer), nothing left over: else :class:`ArchitectureMismatch`."""
    own = model.state_dict()
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]  # older PyTorch had none
    extra = [k for k in mapped if k not in own]
    shapes = [k for k in own if k in mapped and own[k].shape != mapped[k].shape
              and not (classifier_may_differ and (k.startswith("fc.") or k == "stem.0.weight"))]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)})")
        raise ArchitectureMismatch(f"{what} does not fit this network: {'; '.join(parts)}")


def adapt_to(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transfer: sum the first conv's filters over colour when the model takes fewer channels."""
    own = model.state_dict()
    out = dict(state)
    for k, v in state.items():
        if k in own and v.ndim == 4 and own[k].ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1 \
                and v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
            out[k] = v.sum(1, keepdim=True)
    return out


def prepare_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """What ``engine.load_pretrained`` copies from: published checkpoints renamed (and checked to be
    the same network, so a ResNet-56 file refuses a ResNet-20), stems adapted to the input channels."""
    if is_published_layout(state):
        mapped = map_published(state)
        if not any(k.startswith("layers.") for k in model.state_dict()):
            raise ArchitectureMismatch(f"{source} is a published CIFAR ResNet-{published_depth(state)}; "
                                       f"train a CIFAR ResNet (e.g. --model resnet{published_depth(state)})")
        check_same_network(mapped, model, f"{source} (a published CIFAR ResNet-{published_depth(state)})",
                           classifier_may_differ=True)
        state = mapped
    return adapt_to(model, state)


def load_published(model: nn.Module, path: str | Path, name: str = "") -> nn.Module:
    """Load a published CIFAR ResNet checkpoint into ``model`` exactly (same classes, same input)."""
    state = read_state_dict(path)
    if not is_published_layout(state):
        raise ArchitectureMismatch(f"{path}: not a CIFAR ResNet checkpoint (expected conv1, bn1, layer1..3, linear tensors)")
    depth = published_depth(state)
    check_same_network(map_published(state), model, f"{path} (a published CIFAR ResNet-{depth}"
                       + (f", not {name}" if name and name != f"resnet{depth}" else "") + ")")
    own = model.state_dict()
    model.load_state_dict({**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **map_published(state)})
    return model


# --------------------------------------------------------------------------- torchvision


def torchvision_depth(model: nn.Module) -> int:
    """The ImageNet ResNet depth of a ``TorchvisionResNet``, from its block type and stage lengths."""
    import torchvision.models.resnet as tvr

    net = getattr(model, "net", None)
    if net is None or not hasattr(net, "layer4"):
        raise ValueError(f"--pretrained torchvision needs an ImageNet-style resnet (resnet18..152); got {type(model).__name__}")
    kind = "bottleneck" if isinstance(net.layer1[0], tvr.Bottleneck) else "basic"
    layers = [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
    for depth, spec in IMAGENET_LAYERS.items():
        if spec == (kind, layers):
            return depth
    raise ValueError(f"--pretrained torchvision: no torchvision ResNet has {kind} blocks {layers}")


def torchvision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for this network's depth, from the local torch hub cache only
    (no download in the middle of a run)."""
    import torchvision.models as tvm

    depth = torchvision_depth(model)
    weights = getattr(tvm, f"ResNet{depth}_Weights").DEFAULT
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not file.is_file():
        raise FileNotFoundError(
            f"torchvision's ResNet-{depth} weights ({weights}) are not in the local cache {file}; fetch them once with "
            f"`python -c \"import torchvision; torchvision.models.{weights}.get_state_dict(progress=True)\"` "
            "(needs internet) or set TORCH_HOME to a cache that has them")
    return torch.load(file, map_location="cpu", weights_only=True)
