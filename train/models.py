"""The ResNet family, one registry: ``create_model(name, num_classes, in_channels)``.

Reads like the papers' tables:
- CIFAR networks of He et al. 2015, section 4.2: 3 stages of 16/32/64 channels, 6n+2 layers,
  ``resnetN`` with identity shortcuts (option A zero-padding, option B projection) and
  ``plainN`` without shortcuts (the degradation experiment).
- Pre-activation ("v2", He et al. 2016) versions: ``resnetNv2`` for both families.
- ImageNet-style ``resnet18..152`` from torchvision, with a small-image stem for 32/48 px inputs.
- ``resnet9``: the wide, shallow residual net of the fast CIFAR training lineage (throughput).
- ``airbench``: airbench94's network (Jordan 2024), the fastest known way to 94% on CIFAR-10; not residual,
  kept beside ResNet-9 as the time-to-accuracy reference.
- Any of them as an :class:`Ensemble` of N (``ensemble=N``): trained side by side, answering as one.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # torchvision is imported where an ImageNet-style net is built: importing it costs every
    import torchvision.models as tvm  # reslab process ~1 s (its ops import torch._dynamo), most never need it

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(fn: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: (n.rstrip("0123456789v").rstrip("_"), len(n), n))


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, ensemble: int = 1, **kwargs: Any) -> nn.Module:
    """Build a registered network; ``kwargs`` are the builder's options (e.g. ``shortcut="B"``). With
    ``ensemble`` N > 1, N of them, each from its own random start, as one :class:`Ensemble`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"an ensemble needs a whole number of networks (1 or more), not {ensemble!r}")
    nets = [_REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs) for _ in range(ensemble)]
    return nets[0] if ensemble == 1 else Ensemble(nets)


def check_model_args(name: str, model_args: dict[str, Any]) -> None:
    """A ValueError naming the options ``name``'s builder does not take (``--shortcut`` on resnet9 was a TypeError
    from inside a started run)."""
    takes = {k for k in inspect.signature(_REGISTRY[name]).parameters if k not in ("num_classes", "in_channels")}
    unknown = sorted(set(model_args) - takes - {"ensemble"})
    if unknown:
        flags = ", ".join("--shortcut" if k == "shortcut" else f"model_args {k!r}" for k in unknown)
        raise ValueError(f"{flags}: {name} has no such option (it takes: {', '.join(sorted(takes)) or 'none'})"
                         + ("; shortcuts are the CIFAR ResNets' option (resnet20 ... resnet110)" if "shortcut" in unknown else ""))


def model_width(name: str, model_args: dict[str, Any]) -> int | None:
    """The ``width`` a registered network would be built with, or None for one without that option."""
    param = inspect.signature(_REGISTRY[name]).parameters.get("width") if name in _REGISTRY else None
    return None if param is None else int(model_args.get("width", param.default))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mean_probabilities(member_logits: torch.Tensor) -> torch.Tensor:
    """(members, N, classes) logits -> (N, classes) log of the members' mean softmax probabilities: what an
    ensemble answers. Logs, so that softmax, argmax and cross-entropy read them as any network's logits."""
    return torch.logsumexp(member_logits.float().log_softmax(-1), 0) - math.log(len(member_logits))


class Ensemble(nn.Module):
    """N networks of one architecture that train side by side on the same batches, each from its own random
    start and on its own loss (the engine's), and answer as one: the mean of their softmax probabilities.

    In training mode ``forward`` gives every member's logits, (members, N, classes), so that no member
    learns to lean on the others (trained on the ensemble's output they would stop differing); in eval mode
    it gives :func:`mean_probabilities`. ``features`` sets the members' last feature maps side by side, so
    Grad-CAM weighs every member's channels by the ensemble's class score."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.features(x) for m in self.members], 1)

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        parts = fmap.chunk(len(self.members), 1)
        logits = torch.stack([m.head(part) for m, part in zip(self.members, parts)])
        return logits if self.training else mean_probabilities(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- CIFAR (section 4.2)


class ShortcutA(nn.Module):
    """Option A: identity with stride-2 subsampling and zero-padded extra channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def _shortcut(in_planes: int, planes: int, stride: int, option: str, preact: bool) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if option == "A":
        return ShortcutA(in_planes, planes, stride)
    conv = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
    return conv if preact else nn.Sequential(conv, nn.BatchNorm2d(planes))


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU (He et al. 2015, Fig. 2)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str | None = "A") -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.shortcut = None if shortcut is None else _shortcut(in_planes, planes, stride, shortcut, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place (as torchvision's blocks): BatchNorm's backward needs its input, not its output, so the
        # ReLU and the shortcut's add may overwrite it; the eager bf16 step is ~5% faster (docs/performance.md).
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out += self.shortcut(x)
        return F.relu(out, inplace=True)


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv with a clean identity path (He et al. 2016, Fig. 1b)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str | None = "B") -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_planes), conv3x3(in_planes, planes, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes)
        self.shortcut = None if shortcut is None else _shortcut(in_planes, planes, stride, shortcut, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x), inplace=True)
        out = self.conv2(F.relu(self.bn2(self.conv1(pre)), inplace=True))
        if self.shortcut is None:
            return out
        # Projection shortcuts see the pre-activated input, identity ones the raw input.
        return out + (self.shortcut(x) if isinstance(self.shortcut, (nn.Identity, ShortcutA)) else self.shortcut(pre))


class PreActBottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck in pre-activation order, for ResNet-50/101/152 v2."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str | None = "B") -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1, self.conv1 = nn.BatchNorm2d(in_planes), nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes, stride)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = None if shortcut is None else _shortcut(in_planes, out_planes, stride, "B", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x), inplace=True)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        out = self.conv3(F.relu(self.bn3(out), inplace=True))
        if self.shortcut is None:
            return out
        return out + (x if isinstance(self.shortcut, nn.Identity) else self.shortcut(pre))


class ResNet(nn.Module):
    """Stem, stages of blocks, global pooling, classifier: every non-torchvision network here.

    ``stages`` lists (blocks, channels, stride); ``stem`` is "cifar" (3x3, 16 ch) or
    "imagenet-small" (3x3 stem for 32/48 px inputs); ``preact`` adds the final BN-ReLU of v2.
    """

    def __init__(
        self,
        block: type[nn.Module],
        stages: list[tuple[int, int, int]],
        num_classes: int = 10,
        in_channels: int = 3,
        stem_channels: int = 16,
        shortcut: str | None = "A",
        preact: bool = False,
    ) -> None:
        super().__init__()
        self.in_planes = stem_channels
        self.preact = preact
        stem: list[nn.Module] = [conv3x3(in_channels, stem_channels)]
        if not preact:
            stem += [nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem)
        self.layers = nn.Sequential(*(self._make_layer(block, n, c, s, shortcut) for n, c, s in stages))
        final = self.in_planes
        self.final_act = nn.Sequential(nn.BatchNorm2d(final), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.fc = nn.Linear(final, num_classes)
        self._init_weights()

    def _make_layer(self, block: type[nn.Module], blocks: int, planes: int, stride: int, shortcut: str | None) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s, shortcut))
            self.in_planes = planes * block.expansion  # type: ignore[attr-defined]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map of the last residual stage (what Grad-CAM looks at)."""
        return self.final_act(self.layers(self.stem(x)))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        """Pooling and classifier on ``features``' output."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def _cifar_stages(depth: int) -> list[tuple[int, int, int]]:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return [(n, 16, 1), (n, 32, 2), (n, 64, 2)]


def _cifar_builder(depth: int, residual: bool, preact: bool) -> ModelBuilder:
    def build(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> nn.Module:
        block = PreActBlock if preact else BasicBlock
        return ResNet(block, _cifar_stages(depth), num_classes, in_channels, 16, shortcut if residual else None, preact)

    return build


for _d in CIFAR_DEPTHS:
    register_model(f"resnet{_d}")(_cifar_builder(_d, residual=True, preact=False))
    register_model(f"plain{_d}")(_cifar_builder(_d, residual=False, preact=False))
    register_model(f"resnet{_d}v2")(_cifar_builder(_d, residual=True, preact=True))


# --------------------------------------------------------------------------- ImageNet-style

IMAGENET_LAYERS: dict[int, tuple[str, list[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet with a small-image stem (3x3 conv, stride 1, no max-pool) when asked."""

    def __init__(self, net: tvm.ResNet, in_channels: int, small_input: bool) -> None:
        super().__init__()
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()  # type: ignore[assignment]
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(self.net.avgpool(fmap), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _imagenet_builder(depth: int) -> ModelBuilder:
    def build(num_classes: int = 1000, in_channels: int = 3, small_input: bool = True) -> nn.Module:
        import torchvision.models as tvm

        net = getattr(tvm, f"resnet{depth}")(weights=None, num_classes=num_classes)
        return TorchvisionResNet(net, in_channels, small_input)

    return build


def _imagenet_v2_builder(depth: int) -> ModelBuilder:
    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        kind, layers = IMAGENET_LAYERS[depth]
        block = PreActBlock if kind == "basic" else PreActBottleneck
        stages = [(n, c, 1 if i == 0 else 2) for i, (n, c) in enumerate(zip(layers, (64, 128, 256, 512)))]
        return ResNet(block, stages, num_classes, in_channels, 64, "B", preact=True)

    return build


for _d in IMAGENET_LAYERS:
    register_model(f"resnet{_d}")(_imagenet_builder(_d))
    register_model(f"resnet{_d}v2")(_imagenet_v2_builder(_d))


# --------------------------------------------------------------------------- throughput-shaped


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, pool: bool = False) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(cout), nn.GELU()]
        super().__init__(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBN(channels, channels), ConvBN(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """Wide, shallow residual net of the fast-CIFAR lineage (Page 2018; airbench): few layers, many FLOPs
    per layer, which is what a CPU's matrix units like."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.stem = ConvBN(in_channels, w[0])
        self.layers = nn.Sequential(
            ConvBN(w[0], w[1], pool=True), Residual(w[1]),
            ConvBN(w[1], w[2], pool=True),
            ConvBN(w[2], w[3], pool=True), Residual(w[3]),
        )
        self.fc = nn.Linear(w[3], num_classes, bias=False)
        self.scale = 0.125

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        # Global max pooling as a pooling op, not torch.amax: amax's backward sends the gradient to the
        # elements equal to the maximum, and compiled in bf16 Inductor keeps the fused GELU's output in
        # fp32 for the forward's max while the backward compares the bf16-rounded one, so no element is
        # equal and the gradient is 0/0 (docs/performance.md). Max pooling's backward uses the indices.
        return self.fc(F.adaptive_max_pool2d(fmap, 1).flatten(1)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("resnet9")
def resnet9(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    return ResNet9(num_classes, in_channels, width)


class AirbenchBlock(nn.Sequential):
    """conv, 2x2 max pool, BN, GELU, conv, BN, GELU: each conv starts as the identity on its first input
    channels (dirac), each BN learns a shift only (its scale stays 1) and follows the batch fast (momentum
    0.4: 60% of the running statistics kept per step), which is what let airbench shorten its schedule."""

    def __init__(self, cin: int, cout: int) -> None:
        convs = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.Conv2d(cout, cout, 3, padding=1, bias=False)]
        norms = [nn.BatchNorm2d(cout, momentum=0.4), nn.BatchNorm2d(cout, momentum=0.4)]
        for conv in convs:
            nn.init.dirac_(conv.weight.data[: conv.in_channels])
        for bn in norms:
            bn.weight.requires_grad_(False)
        super().__init__(convs[0], nn.MaxPool2d(2), norms[0], nn.GELU(), convs[1], norms[1], nn.GELU())


class Airbench(nn.Module):
    """airbench94's network: a 2x2 stem of 2 x (channels x 4) filters, meant to be whitened (``--whiten``:
    the +/- eigenvectors of the 2x2 patch covariance fill it exactly), then three blocks of widths 64, 256, 256
    (``width`` scales them, 64 = airbench), global max pooling and a linear head scaled by 1/9."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        w = [width, width * 4, width * 4]
        stem = 2 * in_channels * 2 * 2  # +/- every direction of a 2x2 patch
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 2, bias=True), nn.GELU())
        self.blocks = nn.Sequential(AirbenchBlock(stem, w[0]), AirbenchBlock(w[0], w[1]), AirbenchBlock(w[1], w[2]))
        self.fc = nn.Linear(w[2], num_classes, bias=False)
        self.scale = 1 / 9

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_max_pool2d(fmap, 1).flatten(1)) * self.scale  # a pooling op, not amax: see ResNet9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("airbench")
def airbench(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    return Airbench(num_classes, in_channels, width)
