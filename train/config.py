"""One dataclass holds a training run's whole configuration (nanoGPT style)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

AUGMENT_CHOICES = ("none", "flip", "crop-flip", "album")  # train/augment.py implements them
FLIP_CHOICES = ("random", "alternate")  # how the flipping augmentations mirror an image from epoch to epoch
# Per-dataset defaults: CIFAR-10 is served well by crop+flip (the paper's recipe); faces gain from
# small rotations/shifts, lighting changes and occlusion.
DEFAULT_AUGMENT = {"cifar10": "crop-flip", "fer2013": "album"}

RECIPES_DIR = Path(__file__).parent / "recipes"

# Test-time augmentation levels (airbench's): forward passes per image at each level. 1: the image and its
# mirror; 2: also both shifted one pixel up-left and down-right, the shifted pair weighing as much as the plain pair.
TTA_VIEWS = {0: 1, 1: 2, 2: 6}

# Per-dataset defaults, used where the user gave nothing.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": {"model": "resnet20", "lr": 0.1, "batch_size": 128, "weight_decay": 5e-4, "epochs": 30},
    # FER-2013 (48 px faces, 7 classes) wants more width than the CIFAR ResNets' 16-64 channels: the wide,
    # shallow ResNet-9 at width 32 reaches higher accuracy per minute, and its wide layers keep the bf16
    # units busy (docs/performance.md).
    "fer2013": {"model": "resnet9", "model_args": {"width": 32}, "lr": 0.1, "batch_size": 128, "weight_decay": 5e-4,
                "epochs": 30},
}


# What each numeric setting takes, checked once the dataset's defaults are filled in, so that a bad value is one
# line before any data is read or run started (it was silently a diverging run, a default, or a traceback).
# NaN fails every test.
BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 1, "a whole number of epochs, at least 1"),
    "min_budget_epochs": (lambda v: v >= 0, "a whole number of epochs, 0 (off) or more"),
    "max_steps": (lambda v: v is None or v >= 1, "a whole number of steps, at least 1"),
    "batch_size": (lambda v: v >= 1, "a whole number of images, at least 1"),
    "lr": (lambda v: 0 < v < math.inf, "a learning rate above 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "0 or more"),
    "momentum": (lambda v: 0 <= v < 1, "a value from 0 up to (not including) 1"),
    "bn_bias_lr_scale": (lambda v: 0 < v < math.inf, "a multiple of the learning rate above 0"),
    "warmup": (lambda v: 0 <= v <= 1, "a fraction of training from 0 to 1"),
    "milestones": (lambda v: all(0 < m < math.inf for m in v),
                   "fractions of training (<= 1) or step numbers, each above 0"),
    "gamma": (lambda v: 0 <= v < math.inf, "a factor of 0 or more (e.g. 0.1; below 0 the lr is negative: ascent)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "a value from 0 (off) up to (not including) 1"),
    "class_weights": (lambda v: 0 <= v <= 1, "a power from 0 (off) to 1 (inverse frequency)"),
    "ema": (lambda v: 0 <= v < 1, "a decay from 0 (off) up to (not including) 1, e.g. 0.999"),
    "sam": (lambda v: 0 <= v < math.inf, "a radius above 0 (e.g. 0.05), or 0 for off"),
    "mixup": (lambda v: 0 <= v < math.inf, "an alpha above 0 (e.g. 0.2), or 0 for off"),
    "val_fraction": (lambda v: 0 <= v < 1, "a share of the training images from 0 up to (not including) 1"),
    "aug_strength": (lambda v: 0 <= v < math.inf, "a scale of 0 or more"),
    "crop_pad": (lambda v: v >= 0, "0 or more pixels"),
    "crop_size": (lambda v: v >= 0, "0 (whole images) or a side in pixels"),
    "full_size_finish": (lambda v: 0 <= v <= 1, "a fraction of training from 0 to 1"),
    "workers": (lambda v: v >= 1, "a whole number of threads, at least 1"),
    "seed": (lambda v: v >= 0, "a whole number, 0 or more"),
}


def check_bound(name: str, value: Any) -> None:
    """Raise the one-line error for a setting outside BOUNDS."""
    ok, takes = BOUNDS[name]
    try:
        fits = ok(value)
    except TypeError:  # a config file's `epochs: ten`
        fits = False
    if not fits:
        shown = repr(value) if isinstance(value, str) else value
        raise ValueError(f"--{name.replace('_', '-')} takes {takes}, not {shown}")


CHAMPION = "champion"  # the alias the best registered version holds (the demo serves it)


def registered_name(dataset: str) -> str:
    """The registry name of a dataset's tuned models (``reslab tune`` and ``make run`` register there)."""
    return f"{dataset}-resnet"


def champion_uri(dataset: str, alias: str = CHAMPION) -> str:
    return f"models:/{registered_name(dataset)}@{alias}"


@dataclass
class TrainConfig:
    # what
    dataset: str = "cifar10"
    model: str = ""  # empty: the dataset's default
    model_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"shortcut": "B"}
    data: str | None = None
    download: bool = False
    subset: int | None = None  # stratified subset of the train split
    val_fraction: float = 0.1
    # how long
    epochs: int = 0  # 0: the dataset's default
    max_steps: int | None = None  # stop after this many optimizer steps (paper-style budgets)
    time_budget: float | None = None  # seconds of wall clock (training + evaluation); the length follows from measured speed
    min_budget_epochs: int = 0  # with a time budget: narrow the network until the measured speed buys this many epochs
    patience: int | None = None  # stop when validation accuracy has not improved for this many epochs (None: never)
    restore_best: bool = False  # end with the best validation epoch's weights, not the last (train/stopping.py)
    # optimisation
    batch_size: int = 0
    lr: float = 0.0
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = -1.0  # <0: the dataset's default
    bn_bias_lr_scale: float = 1.0  # BatchNorm shifts learn at this multiple of the learning rate (airbench: 64)
    schedule: str = "onecycle"  # onecycle | cosine | step | constant
    warmup: float = 0.15  # fraction of training spent warming up (onecycle, cosine)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step schedule, fractions of training
    gamma: float = 0.1
    label_smoothing: float = 0.0
    class_weights: float = 0.0  # weigh class c's loss by (1/train count)^POWER, mean 1 per image (0: off, 1: balanced)
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off)
    sam: float = 0.0  # sharpness-aware minimisation's radius rho (0: off; 0.05-0.1 is usual; each step costs 2 passes)
    # data pipeline
    augment: str = "auto"  # auto | none | flip | crop-flip | album
    aug_strength: float = 1.0
    crop_pad: int = 4
    crop_size: int = 0  # train on random crops of this side (0: the whole image); evaluation sees whole images
    full_size_finish: float = 0.0  # with crop_size: the last fraction of the steps trains on whole images, as evaluation sees them
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha) blending weight (0: off; 0.2-0.4 is usual)
    flip: str = "random"  # random: each image mirrored with p=0.5 each epoch; alternate: every other epoch (airbench)
    workers: int = 1  # augmentation threads for the albumentations path
    tta: int = 0  # test-time augmentation at evaluation: 0 off, 1 the image and its mirror, 2 also shifted by a pixel
    # machine
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool | None = None  # None: auto (train/engine.py: compile_decision)
    seed: int = 0
    # bookkeeping
    pretrained: str | None = None  # local state dict, or "torchvision"
    whiten: bool = False  # first convolution = fixed patch-whitening transform of the training images (train/whitening.py)
    checkpoint_dir: str | None = None
    evaluate_test: bool = True
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """Fill the per-dataset defaults, so that what is logged is what ran."""
        d = DATASET_DEFAULTS.get(self.dataset, DATASET_DEFAULTS["cifar10"])
        c = dataclasses.replace(self)
        if not c.model:  # the dataset's default model comes with its options (user options still win)
            c.model, c.model_args = d["model"], {**d.get("model_args", {}), **c.model_args}
        c.epochs = c.epochs or d["epochs"]
        c.batch_size = c.batch_size or d["batch_size"]
        c.lr = c.lr or d["lr"]
        c.weight_decay = d["weight_decay"] if c.weight_decay < 0 else c.weight_decay
        if c.augment == "auto":
            c.augment = DEFAULT_AUGMENT.get(c.dataset, "crop-flip")
        if c.flip not in FLIP_CHOICES:
            raise ValueError(f"--flip takes one of {', '.join(FLIP_CHOICES)}, not {c.flip!r}")
        c.tta = int(c.tta)  # recipes and older configs write true/false
        if c.tta not in TTA_VIEWS:
            raise ValueError(f"--tta takes a level in {sorted(TTA_VIEWS)}, not {c.tta}")
        for name in BOUNDS:
            check_bound(name, getattr(c, name))
        if c.whiten and c.pretrained:
            raise ValueError("--whiten sets the first layer from the data, --pretrained/--init-from from weights: choose one")
        return c

    def check_image_size(self, image_size: int) -> None:
        """What only the data's image size can refute: a training crop larger than the padded image. Here, not in
        ``fit`` alone, so that a search space is checked against its dataset before its study starts."""
        pad = self.crop_pad if self.augment == "crop-flip" else 0
        if self.crop_size > image_size + 2 * pad:
            raise ValueError(f"--crop-size {self.crop_size} does not fit the dataset's {image_size}x{image_size} images")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        if d.get("time_budget") is not None:  # recipes write durations: 13m, 1h30m
            from .budget import parse_duration

            d = {**d, "time_budget": parse_duration(d["time_budget"])}
            if d["time_budget"] <= 0:
                raise ValueError("the time budget must be above 0 seconds")
        return cls(**d)


def load_yaml(path: str | Path, what: str = "config file", keys: str = "config keys") -> dict[str, Any]:
    """A YAML mapping, with one-line errors naming the file and what it should hold."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: {what} not found")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise ValueError(f"{p}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}"
                         + (f" at line {where.line + 1})" if where else ")")) from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping of {keys}")
    return d


def recipe(name: str, dataset: str) -> dict[str, Any]:
    """A named recipe file (``train/recipes/<name>.yaml``) holds one section per dataset."""
    p = RECIPES_DIR / f"{name}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(known) or 'none'}")
    d = load_yaml(p)
    if dataset not in d:
        raise ValueError(f"recipe {name!r} has no section for {dataset}; it has {', '.join(d)}")
    return d[dataset]
