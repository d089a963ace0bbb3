"""The training loop: read it top to bottom in :func:`fit`.

Data stays in memory as uint8; batches are gathered by index, augmented as whole batches on the
device (crop/flip) or ahead in threads (albumentations), normalised on the device, and run in
bf16 autocast + channels_last where the hardware supports it. The engine knows nothing of MLflow
or Optuna: it reports each epoch to callbacks, which may log it or stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import shutil
import statistics
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .augment import mixup, normalize, random_crop_flip
from .budget import (CALIBRATION_MIN_STEPS, CALIBRATION_SKIP, CALIBRATION_STEPS, FINAL_REPLAN_STEPS, REPLAN_MIN_STEPS,
                     NARROWEST_WIDTH, REPLANS_PER_EPOCH, Horizon, TimeBudget, format_duration)
from .config import TTA_VIEWS, TrainConfig
from .data import ImageData, split_indices
from .errors import DivergedError, ReslabWarning
from .interrupt import raise_if_terminated, signals_deferred
from .loader import BatchLoader, stream_seed
from .models import create_model, mean_probabilities, model_width
from .stopping import BestEpoch
from .stopping import check as check_stopping
from .whitening import whiten_first_conv

EpochCallback = Callable[[int, dict[str, float]], None]


# --------------------------------------------------------------------------- machine


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def select_device(name: str = "auto") -> torch.device:
    """The device ``--device`` names; a name torch does not know, or a GPU this machine lacks, is a ValueError
    (one line from the CLI, raised before any run starts)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: choose auto, cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 on")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: reslab trains on auto, cpu or cuda[:N]")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":  # bf16 on tensor cores from Ampere (8.x) on; before it torch emulates bf16 slowly,
        # so a V100 or T4 gets fp16 with its gradient scaler (is_bf16_supported() counts the emulation as support)
        return "bf16" if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------- model & optimiser


def load_pretrained(model: nn.Module, source: str) -> tuple[int, list[str]]:
    """Copy matching tensors from a state dict (file or torchvision cache) into ``model``.

    Tensors whose shape differs (the classifier for another class count, a stem for other
    channels) are skipped and named, so transfer between datasets works.
    """
    from .pretrained import prepare_state, read_state_dict, torchvision_state

    if source == "torchvision":  # chosen by the network's architecture, from the local cache
        state = torchvision_state(model)
    else:  # .pt/.th/.safetensors; published CIFAR ResNet checkpoints are renamed in prepare_state
        state = read_state_dict(source)
    state = prepare_state(model, state, source)
    own = model.state_dict()
    prefix = "net." if any(k.startswith("net.") for k in own) and not any(k.startswith("net.") for k in state) else ""
    loaded, skipped = {}, []
    for k, v in state.items():
        key = prefix + k
        if key in own and own[key].shape == v.shape:
            loaded[key] = v
        else:
            skipped.append(k)
    if not loaded:
        raise ValueError(f"{source}: no tensor matches the model (is it the same architecture?)")
    model.load_state_dict(loaded, strict=False)
    return len(loaded), skipped


def build_model(cfg: TrainConfig, data: ImageData, train_x: np.ndarray | None = None) -> nn.Module:
    """The configured network; ``--whiten`` fits its first layer to ``train_x`` (the run's training images, so
    neither its validation images nor, under ``--subset``, images outside the subset; default: the whole split)."""
    model = create_model(cfg.model, data.num_classes, data.channels, **cfg.model_args)
    members = list(getattr(model, "members", [model]))
    if cfg.pretrained:
        if len(members) > 1:
            raise ValueError("an ensemble's networks each start from their own random weights: "
                             "leave out --pretrained/--init-from, or train one network")
        n, skipped = load_pretrained(model, cfg.pretrained)
        print(f"initialised {n} tensors from {cfg.pretrained}" + (f"; kept fresh: {', '.join(skipped)}" if skipped else ""))
    elif cfg.whiten:  # a resumed run then loads its checkpoint over it; the layer stays frozen
        for member in members:
            whiten_first_conv(member, data.train_x if train_x is None else train_x, data.mean, data.std, cfg.seed)
    return model


FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only: BatchNorm parameters and biases are not decayed. With
    ``cfg.bn_bias_lr_scale`` != 1 the BatchNorm shifts get a group of their own at that multiple of the learning
    rate (airbench's 64: with the BN scale frozen, the shift is what moves the activations' threshold)."""
    shifts = set() if cfg.bn_bias_lr_scale == 1 else {
        id(m.bias) for m in model.modules() if isinstance(m, BATCH_NORMS) and m.bias is not None}
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and id(p) not in shifts]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if shifts:
        groups.append({"params": [p for p in model.parameters() if id(p) in shifts], "weight_decay": 0.0,
                       "lr": cfg.lr * cfg.bn_bias_lr_scale})
    # one fused kernel over all parameters instead of a few small ops per tensor: ResNet-20's SGD step
    # 1.16 ms -> 0.38 ms on the CPU (docs/performance.md); same update, on the devices that have it
    fused = all(p.device.type in FUSED_OPTIMIZER_DEVICES for p in model.parameters()) or None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def lr_factor(schedule: str, step: int, total: int, warmup: float, milestones: Sequence[float], gamma: float) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``."""
    t = step / max(1, total)
    if schedule == "onecycle":  # linear warm-up, then linear decay to zero
        w = max(warmup, 1e-8)
        return t / w if t < w else max(0.0, (1 - t) / max(1e-8, 1 - w))  # --warmup 1: all warm-up, no 0/0
    if schedule == "cosine":
        if warmup and t < warmup:
            return t / warmup
        p = (t - warmup) / max(1e-8, 1 - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    if schedule == "step":  # milestones <= 1 are fractions of training, larger ones are iterations
        passed = sum(step >= (m * total if m <= 1 else m) for m in milestones)
        return gamma**passed
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; choose onecycle, cosine, step or constant")


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs, built once per command: the device, the precision, the memory format,
    the dataset's normalisation on that device and the DDP group (one process without torchrun)."""

    device: torch.device
    precision: str
    channels_last: bool
    mean: torch.Tensor
    std: torch.Tensor
    dist: distributed.Context = distributed.Context()

    @classmethod
    def create(cls, cfg: TrainConfig, data: ImageData, join: bool = False) -> Runtime:
        """``cfg``'s device and precision for ``data``. ``join``: under torchrun, join the process group
        and take this rank's GPU (what training does; evaluation alone stays one process)."""
        device = select_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
        ctx = distributed.Context()
        if join:
            ctx, device = distributed.context(device)
        return cls(device, precision, cfg.channels_last, torch.tensor(data.mean, device=device),
                   torch.tensor(data.std, device=device), ctx)

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` on this device, in this memory format."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, xb: torch.Tensor) -> torch.Tensor:
        """A uint8 NHWC batch (on this device) as the normalised float input the model takes."""
        return normalize(xb, self.mean, self.std, self.channels_last)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    labels: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    images_per_sec: float


def tta_logits(model: nn.Module, xb: torch.Tensor, level: int) -> torch.Tensor:
    """Logits averaged over the views of a test-time augmentation level (config.TTA_VIEWS), airbench's way:
    level 1 the image and its mirror; level 2 half of that plus half of the same for the image shifted one
    pixel up-left and down-right (reflect padding), so a shift of the object by a pixel cannot flip the answer."""
    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return (model(v).float() + model(v.flip(3)).float()) / 2 if level else model(v).float()

    logits = mirrored(xb)
    if level >= 2:
        h, w = xb.shape[2:]
        padded = F.pad(xb, (1, 1, 1, 1), mode="reflect")
        shifted = (mirrored(padded[:, :, :h, :w]) + mirrored(padded[:, :, 2:, 2:])) / 2
        logits = (logits + shifted) / 2
    return logits


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, rt: Runtime, tta: int = 0, batch_size: int = 500) -> torch.Tensor:
    """Logits (float32, CPU) for NHWC uint8 images; ``tta`` is a test-time augmentation level (0, 1, 2)."""
    with contextlib.suppress(NotImplementedError):  # an exported (pt2) module is frozen in eval mode
        model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = rt.inputs(torch.from_numpy(x[i : i + batch_size]).to(rt.device))
        with autocast(rt.device, rt.precision):
            logits = tta_logits(model, xb, int(tta))
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, rt: Runtime, tta: int = 0) -> EvalResult:
    """Under DDP (``rt.dist``) each rank predicts a slice and all ranks get the same full result."""
    t0 = time.perf_counter()
    logits = distributed.sharded(lambda part: predict(model, part, rt, tta), x, rt.dist)
    dt = time.perf_counter() - t0
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    preds = logits.argmax(1)
    acc = (preds == labels).float().mean().item() if len(labels) else float("nan")
    return EvalResult(loss, acc, labels.numpy(), preds.numpy(), logits.softmax(1).numpy(), len(x) / max(dt, 1e-9))


# --------------------------------------------------------------------------- checkpoints


PREVIOUS = "previous.pt"  # the checkpoint before last.pt, kept beside it: a torn or corrupt last.pt falls back to it


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (torn, corrupt, not a checkpoint), with nothing to fall back on."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically and durably, so a kill or a power cut mid-write leaves a readable checkpoint:
    a temp file of this writer's own (pid and a random tag: concurrent writers never share one),
    fsynced, then the current file kept as ``previous.pt`` (a hard link, so ``path`` always exists)
    and the temp file renamed over ``path``, the folder fsynced. Serialised in memory first, so a full
    disk raises a plain OSError (ENOSPC) rather than torch's zip-writer error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    keep = path.with_name(f".{PREVIOUS}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if zipfile.is_zipfile(path):  # torch.save writes a zip: an unreadable file must not push out a good previous.pt
            try:
                os.link(path, keep)
            except OSError:  # a file system without hard links: a copy
                shutil.copyfile(path, keep)
            os.replace(keep, path.with_name(PREVIOUS))
            # rename() between two links of one file does nothing (POSIX): a concurrent writer may
            # have made previous.pt a link to the same last.pt, so the temp link can still be there
            keep.unlink(missing_ok=True)
        tmp.replace(path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        keep.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write checkpoint ({e.strerror})", str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        keep.unlink(missing_ok=True)
        raise


def _read_checkpoint(p: Path) -> dict[str, Any]:
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torn zip, bad pickle opcodes, zeros after a crash: all "unreadable"
        first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:160]  # torch's first sentence
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ck, dict) or "model" not in ck or "epoch" not in ck:
        raise CheckpointError(f"{p}: not a reslab checkpoint (no model state or epoch in it)")
    return ck


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (a file, or a folder's last.pt). A corrupt last.pt falls back to
    previous.pt beside it (one epoch earlier), with a one-line warning; with nothing to fall back on
    it is a one-line :class:`CheckpointError`."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    previous = p.with_name(PREVIOUS)
    if not p.exists() and not previous.exists():
        raise FileNotFoundError(f"{p}: no checkpoint to resume from")
    try:
        return _read_checkpoint(p)
    except (CheckpointError, FileNotFoundError) as e:
        if p.name != "last.pt" or not previous.exists():
            if isinstance(e, FileNotFoundError):
                raise FileNotFoundError(f"{p}: no checkpoint to resume from") from None
            raise
        reason = str(e)
    try:
        ck = _read_checkpoint(previous)
    except CheckpointError as e:
        raise CheckpointError(f"{reason}, and neither is {PREVIOUS} beside it ({str(e).split(' (', 1)[-1]}") from None
    if reason not in _FELL_BACK:  # one warning, though a resume reads the checkpoint more than once
        _FELL_BACK.add(reason)
        warnings.warn(f"{reason}; resuming from {previous} (epoch {ck['epoch']}) instead", CheckpointFallback, stacklevel=2)
    return ck


_FELL_BACK: set[str] = set()


class CheckpointFallback(ReslabWarning):
    """last.pt was unreadable and previous.pt was used."""


# --------------------------------------------------------------------------- one training step


def training_loss(criterion: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One network's loss; for an Ensemble in training, whose logits are (members, N, classes), its members'
    losses summed: each member's gradient is then the one it would get alone."""
    if logits.dim() == 3:
        return torch.stack([criterion(m.float(), y) for m in logits]).sum()
    return criterion(logits.float(), y)


# A cross-entropy this large means logits thousands apart: the run has diverged even while the loss is
# still finite (in fp32 an exploding network can take many steps to overflow to inf or NaN).
DIVERGED_LOSS = 1000.0


@dataclass
class Stepper:
    """One optimizer step on a prepared batch, with everything it updates. ``fit`` and ``reslab bench``
    share it, so the benchmark times exactly the step that training runs."""

    model: nn.Module
    step_fn: Callable[[torch.Tensor], torch.Tensor]  # the model, its DDP wrapper, or their torch.compile
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ema: torch.optim.swa_utils.AveragedModel | None
    device: torch.device
    precision: str
    compiled: bool = False
    compile_reason: str = ""  # why the step is (not) compiled: --compile, --no-compile or the auto rule
    sam: float = 0.0  # rho of sharpness-aware minimisation: the radius of the weight perturbation (0: off)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to differentiate, the logits: for an ensemble, its answer)."""
        with autocast(self.device, self.precision):
            logits = self.step_fn(x)
            return training_loss(self.criterion, logits, y), mean_probabilities(logits) if logits.dim() == 3 else logits

    def __call__(self, x: torch.Tensor, y: torch.Tensor, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward, optimizer/schedule/EMA update; returns (loss, logits): an ensemble's loss
        per member (its members' mean, comparable with one network's), its logits the ensemble's answer."""
        loss, logits = self._loss(x, y)
        value = loss.item()  # one host sync per step, as the finiteness check always took
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            hint = "try a lower --lr" + (", or leave out --compile (a compiled step rounds bf16 differently; "
                                         "see whether the eager one trains)" if self.compiled else "")
            raise DivergedError(f"loss became {value:.4g}{where} (lr {self.sched.get_last_lr()[0]:.3g}); {hint}")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.sam:
            self._sharpness_aware_gradient(x, y)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        members = len(getattr(self.model, "members", ())) or 1
        return loss / members, logits

    def _sharpness_aware_gradient(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """SAM (Foret et al. 2021): replace the gradient by the one taken at the weights moved ``sam`` along
        it (the nearby point where the loss rises fastest), so that the step seeks flat minima. Costs a second
        forward and backward pass. The direction is the gradient's, normalised, so fp16's loss scale cancels;
        the weights and BatchNorm's running statistics are put back as the first pass left them (copies, so an
        fp16 overflow that the scaler skips leaves no NaN behind): the perturbed pass only serves the gradient."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        weights = [p.detach().clone() for p in params]  # put back exactly: (w + e) - e need not round to w
        buffers = [b.detach().clone() for b in self.model.buffers()]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
            scale = self.sam / (norm + 1e-12)
            for p in params:
                p.add_(p.grad * scale.to(p.grad.dtype))
        loss, _ = self._loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)


AUTO_COMPILE_MODELS = re.compile(r"(resnet|plain)(20|32|44|56|110)")  # checked: the compiled step trains like eager
AUTO_COMPILE_MIN_STEPS = 5000  # ~25 s of compilation repaid by a 5-10% faster step (docs/performance.md)
AUTO_COMPILE_MIN_BUDGET = 600.0  # seconds: a budgeted run's step count is unknown until timed; shorter
# budgets would spend ~25-60 s of their minutes compiling for a 5-10% faster step


def compile_decision(cfg: TrainConfig, device: torch.device, precision: str, total_steps: int) -> tuple[bool, str]:
    """Whether the step is compiled, and why. ``--compile``/``--no-compile`` decide; by default it is
    on where it was measured to help and known to train correctly: the paper's CIFAR ResNets on a bf16
    CPU, for runs long enough to repay the compilation, with a C++ compiler for Inductor."""
    if cfg.compile is not None:
        return cfg.compile, "--compile" if cfg.compile else "--no-compile"
    if device.type != "cpu" or precision != "bf16":
        return False, "auto: only on bf16 CPUs"
    if not AUTO_COMPILE_MODELS.fullmatch(cfg.model) or cfg.model_args.get("shortcut", "A") not in ("A", None):
        return False, f"auto: not for {cfg.model}{cfg.model_args or ''}"
    if distributed.env_context().enabled:
        return False, "auto: not under DDP (ask with --compile)"
    if cfg.time_budget is not None and cfg.time_budget < AUTO_COMPILE_MIN_BUDGET:
        return False, f"auto: a {format_duration(cfg.time_budget)} budget does not repay the compilation (< {format_duration(AUTO_COMPILE_MIN_BUDGET)})"
    if total_steps < AUTO_COMPILE_MIN_STEPS:
        return False, f"auto: {total_steps} steps do not repay the compilation (< {AUTO_COMPILE_MIN_STEPS})"
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return False, "auto: no C++ compiler for Inductor"
    return True, f"auto: {cfg.model}, {total_steps} steps on a bf16 CPU"


def ema_with_warmup(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """An EMA update whose decay ramps up as (1 + n) / (10 + n) to ``decay`` (n: updates so far). With a
    fixed 0.99 a run of a few dozen steps, such as a low-fidelity tuning trial, would evaluate weights
    that are still mostly the random initialisation; after ~1,000 steps it is the plain EMA."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1 - d)
            else:  # BatchNorm's num_batches_tracked: a counter, not something to average
                a.copy_(c)

    return update


def class_weights(labels: np.ndarray, classes: int, power: float) -> torch.Tensor | None:
    """Per-class loss weights (1 / count)^power, scaled so that the weight averaged over the training images
    is 1 (the loss keeps its scale, so the learning rate means the same); None for power 0. A class with no
    training image gets the largest weight of the others (it never occurs in the loss anyway)."""
    if not power:
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes).astype(np.float64)
    w = np.zeros(classes)
    seen = counts > 0
    w[seen] = counts[seen] ** -power
    w[~seen] = w[seen].max() if seen.any() else 1.0
    w /= (w * counts).sum() / max(counts.sum(), 1.0)
    return torch.tensor(w, dtype=torch.float32)


def make_stepper(cfg: TrainConfig, model: nn.Module, horizon: Horizon | int, device: torch.device, precision: str,
                 train_module: nn.Module | None = None, weight: torch.Tensor | None = None) -> Stepper:
    """Optimiser, schedule, grad scaler (fp16 on CUDA), EMA and loss for ``cfg`` (``weight``: per-class loss
    weights, see :func:`class_weights`); ``train_module`` runs the forward pass (a DDP wrapper), else the model
    itself. The schedule reads ``horizon`` at every step, so a time budget can set the run's length once its step
    time is measured."""
    horizon = horizon if isinstance(horizon, Horizon) else Horizon(horizon)
    total_steps = horizon.total
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(cfg.schedule, s, horizon.total, cfg.warmup, cfg.milestones, cfg.gamma)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema), use_buffers=True)
    module = model if train_module is None else train_module
    step_fn = module
    compiled, why = compile_decision(cfg, device, precision, total_steps)
    if compiled:
        from .compiled import batchnorm_note, compile_module  # registers custom ops: only for runs that compile

        step_fn = compile_module(module, device)
        why = f"{why}; {batchnorm_note(device)}"
    criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device),
                                    label_smoothing=cfg.label_smoothing)
    return Stepper(model, step_fn, opt, sched, scaler, criterion, ema, device, precision, compiled, why, cfg.sam)


def make_loader(cfg: TrainConfig, x: np.ndarray, y: np.ndarray, device: torch.device,
                dctx: distributed.Context = distributed.Context()) -> BatchLoader:
    """The training loader for ``cfg`` (albumentations ahead in threads when asked; this rank's shard under DDP)."""
    album = cfg.aug_strength if cfg.augment == "album" else None
    return BatchLoader(x, y, distributed.per_rank_batch(cfg.batch_size, dctx), shuffle=True,
                       drop_last=len(x) > cfg.batch_size, seed=cfg.seed, album_strength=album,
                       workers=cfg.workers, pin_memory=device.type == "cuda", rank=dctx.rank, world_size=dctx.world_size,
                       device=device if device.type == "cuda" else None,
                       alternate_flip=cfg.augment in FLIPPING and cfg.flip == "alternate")


KEPT_MARKS = 8  # plan points a budgeted run keeps: at the last stretch's 5-step plans, still one 20 or more steps back


def timed_since(marks: list[tuple[int, float]], step: int, fallback: tuple[int, float]) -> tuple[int, float]:
    """The (step, train seconds) a plan at ``step`` times the speed from: the latest earlier plan at least
    REPLAN_MIN_STEPS back (fewer steps are too few to time), else ``fallback``."""
    return next((m for m in reversed(marks) if step - m[0] >= REPLAN_MIN_STEPS), fallback)


def augment_generator(seed: int, epoch: int, dctx: distributed.Context = distributed.Context()) -> torch.Generator:
    """The random stream of an epoch's batched augmentation (crops, flips, mixup): from (seed, epoch) alone, so a
    resumed run draws the same; under DDP each rank's own, else every rank's shard is cropped and flipped alike."""
    return torch.Generator().manual_seed(stream_seed(seed, epoch, 1, rank=dctx.rank, world_size=dctx.world_size))


FLIPPING = ("flip", "crop-flip", "album")  # the augmentations that mirror images


class BatchAugment(NamedTuple):
    """The batched on-device augmentation of a resolved config: crop padding, random flip, crop size (0: the
    image's), mixup's alpha (0: off) and the class count its soft targets need. Alternating flips are the
    loader's: they depend on the image and the epoch."""

    pad: int
    flip: bool
    size: int = 0
    mixup: float = 0.0
    classes: int = 0


def batch_augment(cfg: TrainConfig, classes: int = 0) -> BatchAugment:
    if cfg.mixup and classes < 2:
        raise ValueError("--mixup needs the dataset's number of classes")
    return BatchAugment(cfg.crop_pad if cfg.augment == "crop-flip" else 0,
                        cfg.augment in FLIPPING and cfg.flip == "random", cfg.crop_size, cfg.mixup, classes)


def prepare_batch(xb: torch.Tensor, yb: torch.Tensor, rt: Runtime, aug: BatchAugment,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's uint8 NHWC CPU batch -> normalised float batch on the device, crop/flipped as a whole, and
    its targets: the labels, or with mixup the blended batch's soft targets (N x classes)."""
    xb, yb = xb.to(rt.device, non_blocking=True), yb.to(rt.device, non_blocking=True)
    if aug.pad or aug.flip or aug.size:
        xb = random_crop_flip(xb, aug.pad, aug.flip, gen, aug.size)
    x = rt.inputs(xb)
    return mixup(x, yb, aug.mixup, aug.classes, gen) if aug.mixup else (x, yb)


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """The class each target stands for: the label itself, or the larger share of a mixup target."""
    return target.argmax(1) if target.ndim == 2 else target


def measure_throughput(cfg: TrainConfig, data: ImageData, steps: int = CALIBRATION_STEPS,
                       max_seconds: float | None = None) -> float:
    """Training images/s of ``cfg``'s step on this machine, from a few steps on real batches (the
    weights are thrown away). Budgets are planned from this, never from a number measured elsewhere.
    Each step is timed alone and the median taken: one step slowed by something else on the machine
    would otherwise halve the estimate (seen in the suite). ``max_seconds`` stops the timing early, after
    at least ``CALIBRATION_MIN_STEPS`` steps: on an AVX2-only CPU ten steps of batch 512 take ~24 s, a
    third of a one-minute budget."""
    cfg = dataclasses.replace(cfg.resolved(), compile=False, pretrained=None)
    rt = Runtime.create(cfg, data)
    device = rt.device
    model = rt.place(build_model(cfg, data))
    stepper = make_stepper(cfg, model, 10 * (CALIBRATION_SKIP + steps), device, rt.precision)
    n = min(len(data.train_y), cfg.batch_size * (CALIBRATION_SKIP + steps + 1))
    loader = make_loader(cfg, data.train_x[:n], data.train_y[:n], device)
    aug = batch_augment(cfg, data.num_classes)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    rates: list[float] = []
    timed = 0.0  # seconds of the timed steps so far

    def enough() -> bool:
        return len(rates) >= steps or (max_seconds is not None and len(rates) >= min(steps, CALIBRATION_MIN_STEPS)
                                       and timed >= max_seconds)

    done, t0 = 0, time.perf_counter()
    while not enough():
        for xb, yb in loader.epoch(done):  # the loader's wait counts: each interval is one whole step
            x, y = prepare_batch(xb, yb, rt, aug, gen)
            stepper(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            if done >= CALIBRATION_SKIP:
                rates.append(len(y) / max(t1 - t0, 1e-9))
                timed += t1 - t0
            done, t0 = done + 1, t1
            if enough():
                break
    return float(statistics.median(rates))


PROBE_BATCH = 256  # images a step when timing a width: CPU kernels' per-image speed, in seconds, not minutes
PROBE_SHARE = 0.01  # of the budget, at most, for timing each width (past its first steps)


def run_budget(cfg: TrainConfig, steps_per_epoch: int, val_images: int, test_images: int, image_size: int,
               max_steps: int | None) -> TimeBudget:
    """The TimeBudget of a run of ``cfg``: its validation every epoch, its final evaluation (validation, and the test
    split unless skipped) in its TTA views, at the evaluated image's pixels over a training crop's."""
    return TimeBudget(cfg.time_budget or 0.0, steps_per_epoch, cfg.batch_size, val_images,
                      val_images + (test_images if cfg.evaluate_test else 0), TTA_VIEWS[cfg.tta], max_steps,
                      (image_size / cfg.crop_size) ** 2 if cfg.crop_size else 1.0)


def budget_epochs(cfg: TrainConfig, images_per_sec: float, train_images: int, val_images: int, test_images: int,
                  image_size: int, spent: float = 0.0) -> float:
    """Epochs that ``cfg``'s time budget buys at ``images_per_sec`` with ``spent`` seconds of it gone: the plan a
    budgeted run makes at its first step."""
    steps_per_epoch = max(1, train_images // cfg.batch_size)  # as the loader runs: the last partial batch dropped
    budget = run_budget(cfg, steps_per_epoch, val_images, test_images, image_size, None)
    return budget.plan(0, spent, cfg.batch_size / max(images_per_sec, 1e-9)) / steps_per_epoch


def fit_width(cfg: TrainConfig, data: ImageData) -> tuple[TrainConfig, str | None]:
    """``cfg`` at the widest of its model's width, half, a quarter, ... (down to ``NARROWEST_WIDTH``) whose speed,
    measured here, buys ``cfg.min_budget_epochs`` epochs in its time budget, and a line saying why it was narrowed
    (None: kept as it is). A network that sees too few epochs in the minutes given learns less than a narrower one
    that sees more (docs/performance.md: airbench at width 64 gets ~2.5 epochs of a 14m20s budget on an AVX2-only
    CPU, at width 32 ~8). Off without a budget, for a model without a width, for weights from a file
    (``--pretrained``/``--init-from``: they are the width they are), and under torchrun (the ranks would each measure,
    and must agree)."""
    given, cfg = cfg, cfg.resolved()
    width = model_width(cfg.model, cfg.model_args)
    if (not (cfg.time_budget and cfg.min_budget_epochs) or width is None or cfg.pretrained
            or distributed.env_context().enabled):  # weights from a file fix the width
        return given, None
    start = time.perf_counter()
    train_idx, val_idx = split_indices(data.train_y, cfg.subset, cfg.val_fraction, cfg.seed)
    tried: list[str] = []
    w = width
    while True:
        at = dataclasses.replace(cfg, model_args={**cfg.model_args, "width": w})
        rate = measure_throughput(dataclasses.replace(at, batch_size=min(cfg.batch_size, PROBE_BATCH)), data,
                                  max_seconds=PROBE_SHARE * cfg.time_budget)
        epochs = budget_epochs(at, rate, len(train_idx), len(val_idx), len(data.test_y), data.image_size,
                               time.perf_counter() - start)
        tried.append(f"width {w}: {rate:.0f} img/s, ~{epochs:.1f} epochs")
        if epochs >= cfg.min_budget_epochs or w // 2 < NARROWEST_WIDTH:
            break
        w //= 2
    if w == width:
        return given, None
    why = (f"a {format_duration(cfg.time_budget)} budget buys under {cfg.min_budget_epochs} epochs of {cfg.model} at "
           f"width {width} here: training width {w} instead (measured {'; '.join(tried)}; --min-budget-epochs 0 keeps "
           "the width)")
    return dataclasses.replace(given, model=cfg.model, model_args=at.model_args), why


# --------------------------------------------------------------------------- training


@dataclass
class FitResult:
    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]]
    val: EvalResult | None
    test: EvalResult | None
    train_seconds: float
    images_per_sec: float
    device: str
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_val_accuracy(self) -> float:
        accs = [h["val_acc"] for h in self.history if "val_acc" in h]
        return max(accs) if accs else float("nan")


def fit(
    cfg: TrainConfig,
    data: ImageData,
    callbacks: Sequence[EpochCallback] = (),
    resume: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    spent: float = 0.0,
) -> FitResult:
    """Train ``cfg.model`` on ``data``; return the model, per-epoch history and evaluations. ``spent``: seconds of
    the time budget already used before this call (:func:`fit_width`'s measurements)."""
    cfg = cfg.resolved()
    check_stopping(cfg)
    torch.manual_seed(cfg.seed)
    rt = Runtime.create(cfg, data, join=True)  # under torchrun: join the group, take this rank's GPU
    device, precision, dctx = rt.device, rt.precision, rt.dist
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- data: subset, validation split, loaders
    train_idx, val_idx = split_indices(data.train_y, cfg.subset, cfg.val_fraction, cfg.seed)
    x_train, y_train = data.train_x[train_idx], data.train_y[train_idx]
    x_val, y_val = data.train_x[val_idx], data.train_y[val_idx]
    loader = make_loader(cfg, x_train, y_train, device, dctx)
    if (cfg.patience is not None or cfg.restore_best) and not len(x_val):
        raise ValueError(f"--subset {cfg.subset} with --val-fraction {cfg.val_fraction} leaves no validation images "
                         "for --patience/--restore-best to judge; use a larger subset or fraction")
    cfg.check_image_size(data.image_size)
    aug = batch_augment(cfg, data.num_classes)

    # ---- model, optimiser, schedule
    # a resumed run's weights are its checkpoint's: the --pretrained/--init-from file it began from (an MLflow
    # download in a temp folder) is not read again, and may be gone
    model = rt.place(build_model(dataclasses.replace(cfg, pretrained=None) if resume else cfg, data, x_train))
    steps_per_epoch = max(1, len(loader))
    horizon = Horizon(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        horizon.total = cfg.max_steps
    budget = None
    if cfg.time_budget:  # the horizon is planned from the measured step time (train/budget.py)
        budget = run_budget(cfg, steps_per_epoch, len(x_val), len(data.test_y), data.image_size, cfg.max_steps)
        # until the first plan the epochs' horizon is a placeholder; it must outlast the calibration, else a run of
        # one or two short epochs (a refit configured from a tuning trial, on a small dataset) ends at the placeholder
        # with most of its budget unspent (seen: 5 steps in 12 s of a 45 s budget); --max-steps stays the most
        if not cfg.max_steps:
            horizon.total = max(horizon.total, CALIBRATION_SKIP + CALIBRATION_STEPS + 1)
    train_module = distributed.wrap(model, dctx, device)  # DDP over several ranks, else the model itself
    stepper = make_stepper(cfg, model, horizon, device, precision, train_module,
                           class_weights(y_train, data.num_classes, cfg.class_weights))
    opt, sched, scaler, ema = stepper.opt, stepper.sched, stepper.scaler, stepper.ema
    if stepper.compiled and cfg.progress and dctx.is_main:
        print(f"compiling the training step ({stepper.compile_reason}): the first step takes ~25 s more; "
              "--no-compile skips it")

    history: list[dict[str, float]] = []
    best = BestEpoch(cfg.patience, keep_weights=cfg.restore_best)  # early stopping and the best epoch's weights
    start_epoch, step, trained_seconds, images_seen = 0, 0, 0.0, 0
    if resume:
        ck = load_checkpoint(resume)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck["scaler"]:  # a disabled scaler (bf16, fp32) saves {}; resumed where fp16 enables one, it starts fresh
            scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema"):
            ema.load_state_dict(ck["ema"])
        start_epoch, step, history = ck["epoch"], ck["step"], ck["history"]
        horizon.total = ck.get("horizon", horizon.total)
        trained_seconds, images_seen = ck.get("train_seconds", 0.0), ck.get("images_seen", 0)
        if ck.get("best") is not None:
            best.load_state_dict(ck["best"])
        else:  # a checkpoint from before early stopping (patience and restore were off): its best from history
            for h in history:
                best.update(int(h["epoch"]), h.get("val_acc", float("nan")), None)
        torch.set_rng_state(ck["torch_rng"])
        meta = {**ck.get("meta", {}), **(meta or {})}
        print(f"resumed from {resume} at epoch {start_epoch}")
    ckpt_path = Path(cfg.checkpoint_dir) / "last.pt" if cfg.checkpoint_dir else None
    # wall clock of training *and* per-epoch evaluation: the x axis of time-to-accuracy curves
    wall_start = time.perf_counter() - (history[-1].get("wall_seconds", 0.0) if history else spent)
    timed_from: tuple[int, float] | None = None  # (step, train seconds) where step timing started
    val_seconds: float | None = None  # measured per-epoch validation time
    last_val: EvalResult | None = None  # the latest epoch's validation: of the final weights once the loop ends
    first_step, first_trained = step, trained_seconds
    marks: list[tuple[int, float]] = []  # (step, train seconds) of the last few plans, the latest last
    replan_every = max(REPLAN_MIN_STEPS, steps_per_epoch // REPLANS_PER_EPOCH)

    epoch = start_epoch
    while step < horizon.total and (cfg.max_steps is None or step < cfg.max_steps) and not best.stopped:
        model.train()
        gen = augment_generator(cfg.seed, epoch, dctx)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        t0 = time.perf_counter()

        epochs_planned = math.ceil(horizon.total / steps_per_epoch)
        bar = tqdm(loader.epoch(epoch), total=min(len(loader), horizon.total - step), leave=False, mininterval=1.0,
                   desc=f"epoch {epoch + 1}/{epochs_planned}", disable=not cfg.progress or not dctx.is_main)
        for xb, yb in bar:
            if step >= horizon.total:
                break
            raise_if_terminated()  # a SIGTERM whose exception Python dropped (train/interrupt.py)
            finishing = cfg.full_size_finish > 0 and step >= (1 - cfg.full_size_finish) * horizon.total  # whole images
            x, target = prepare_batch(xb, yb, rt, aug._replace(size=0) if finishing else aug, gen)
            loss, logits = stepper(x, target, f" at epoch {epoch + 1}, step {step + 1}")
            step += 1
            seen += len(yb)
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == hard_labels(target)).sum()
            if budget is not None and step in (first_step + CALIBRATION_SKIP, first_step + CALIBRATION_SKIP + CALIBRATION_STEPS):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = trained_seconds + time.perf_counter() - t0
                if timed_from is None:
                    timed_from = (step, now)
                elif step < horizon.total:  # the first plan, from a few timed steps
                    plan_horizon(budget, horizon, step, timed_from, now, time.perf_counter() - wall_start, None, dctx, device)
                    too_short = budget.evaluation_warning((now - timed_from[1]) / max(1, step - timed_from[0]))
                    if too_short and dctx.is_main:
                        warnings.warn(too_short, ReslabWarning, stacklevel=2)
                    bar.total = min(len(loader), horizon.total - step + bar.n)
                    marks = [(step, now)]
            elif budget is not None and marks and step < horizon.total and (
                    step - marks[-1][0] >= replan_every
                    or (horizon.total - step <= replan_every and step - marks[-1][0] >= FINAL_REPLAN_STEPS)):
                # re-plan within the epoch from the recent steps, so that a machine that slows down (or speeds up)
                # mid-epoch still ends on time; at step counts every rank shares (DDP). A schedule that has reached
                # its end is not reopened (its lr is at zero).
                now = trained_seconds + time.perf_counter() - t0
                plan_horizon(budget, horizon, step, timed_since(marks, step, marks[0]), now,
                             time.perf_counter() - wall_start, val_seconds, dctx, device)
                bar.total = min(len(loader), horizon.total - step + bar.n)
                marks = [*marks[1 - KEPT_MARKS:], (step, now)]
            if cfg.progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.3g}")
        bar.close()
        epoch_seconds = time.perf_counter() - t0
        loss_total, correct_total, seen = distributed.all_sum([loss_sum.item(), float(correct.item()), float(seen)], dctx, device)
        seen = int(seen)
        trained_seconds += epoch_seconds
        images_seen += seen
        eval_model = ema.module if ema is not None else model
        distributed.sync_buffers(eval_model, dctx)  # rank 0's BatchNorm statistics everywhere
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_total / max(seen, 1),
            "train_acc": correct_total / max(seen, 1),
            "lr": opt.param_groups[0]["lr"],
            "images_per_sec": seen / max(epoch_seconds, 1e-9),
            "epoch_seconds": epoch_seconds,
            "elapsed_seconds": trained_seconds,
        }
        if len(x_val):
            tv = time.perf_counter()
            v = last_val = evaluate(eval_model, x_val, y_val, rt, cfg.tta)
            val_seconds = time.perf_counter() - tv
            metrics.update(val_loss=v.loss, val_acc=v.accuracy)
            best.update(epoch + 1, v.accuracy, eval_model)  # the same accuracy on every rank: they stop together
        metrics["wall_seconds"] = time.perf_counter() - wall_start
        if budget is not None:
            if step < horizon.total:  # re-plan with this epoch's validation measured, from the recent steps' speed;
                # a schedule that has reached its end is not reopened (its lr is at zero)
                # the speed since the latest plan at least REPLAN_MIN_STEPS back (an in-epoch plan a few steps before the
                # epoch's end times too few steps); the whole run's average only before any plan
                timed_from = timed_from or (first_step, first_trained)
                plan_horizon(budget, horizon, step, timed_since(marks, step, timed_from), trained_seconds,
                             metrics["wall_seconds"], val_seconds, dctx, device)
                if marks:
                    marks = [*marks[1 - KEPT_MARKS:], (step, trained_seconds)]
            metrics["horizon_steps"] = horizon.total
        history.append(metrics)
        if ckpt_path and dctx.is_main:  # one writer; every rank resumes from the same file
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch + 1, "step": step, "horizon": horizon.total, "history": history, "config": cfg.to_dict(),
                "torch_rng": torch.get_rng_state(), "train_seconds": trained_seconds,
                "images_seen": images_seen, "meta": meta or {}, "best": best.state_dict(),
            })
        if cfg.progress and dctx.is_main:
            val_txt = f" val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_acc']:.4f}" if "val_acc" in metrics else ""
            left = f" | ~{format_duration(cfg.time_budget - metrics['wall_seconds'])} left" if budget is not None else ""
            tqdm.write(f"epoch {epoch + 1:>3}/{math.ceil(horizon.total / steps_per_epoch)} train_loss {metrics['train_loss']:.4f} "
                       f"train_acc {metrics['train_acc']:.4f}{val_txt} {metrics['images_per_sec']:.0f} img/s{left}")
            if best.stopped:
                tqdm.write(f"early stop: val_acc has not improved for {cfg.patience} epochs "
                           f"(best {best.best_acc:.4f} at epoch {best.best_epoch})")
        with signals_deferred():  # a signal cutting an MLflow or Optuna write in half leaves the store locked
            for cb in callbacks:
                cb(epoch, metrics)
        epoch += 1
    cfg.epochs = epoch  # what ran: a budgeted or step-limited run records its real length

    final = ema.module if ema is not None else model
    distributed.sync_buffers(final, dctx)
    restored = cfg.restore_best and best.restore(final)  # every rank kept the same epoch's weights
    val = last_val  # the last epoch's validation saw these very weights (a run ending mid-epoch paid a second pass)
    if len(x_val) and (val is None or restored):
        val = evaluate(final, x_val, y_val, rt, cfg.tta)
    test = None
    if cfg.evaluate_test:
        test = evaluate(final, data.test_x, data.test_y, rt, cfg.tta)
    final.eval()
    if not history:
        warnings.warn("no epoch was trained (already finished?)", stacklevel=2)
    extra: dict[str, Any] = {"compile": stepper.compile_reason, "train_images": len(x_train),
                             "stopping": best.summary(epoch, restored)}
    if budget is not None:
        extra["budget"] = {"budget_seconds": budget.seconds, "budget_steps": horizon.total,
                           "budget_epochs": horizon.total / steps_per_epoch,
                           "budget_wall_seconds": time.perf_counter() - wall_start}
    return FitResult(final, cfg, history, val, test, trained_seconds, images_seen / max(trained_seconds, 1e-9),
                     str(device), precision, extra)


def plan_horizon(budget: TimeBudget, horizon: Horizon, step: int, timed_from: tuple[int, float],
                 trained_seconds: float, wall_seconds: float, val_seconds: float | None,
                 dctx: distributed.Context, device: torch.device) -> None:
    """Set the horizon so that the run ends at its budget, from the step time measured since
    ``timed_from`` (step, train seconds); rank 0's plan holds for every rank."""
    sec_per_step = (trained_seconds - timed_from[1]) / max(1, step - timed_from[0])
    total = budget.plan(step, wall_seconds, sec_per_step, val_seconds)
    horizon.total = int(distributed.all_sum([float(total) if dctx.is_main else 0.0], dctx, device)[0])
