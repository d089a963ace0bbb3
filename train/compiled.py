"""``--compile``: torch.compile the training module, with BatchNorm kept out of Inductor where that is faster.

Inductor fuses BatchNorm's statistics and normalisation with the ReLUs and residual adds around it.
Whether that pays depends on the CPU (2 cores, channels_last bf16 activations, ResNet-20 at batch 128;
docs/performance.md):

- AMD EPYC (AVX-512 BF16, no AMX): Inductor's kernels for that fusion ran ~8x slower than ATen's
  BatchNorm (forward + backward of one 128x16x32x32 block: 20-27 ms against 3 ms); a step with
  BatchNorm inside Inductor 788 images/s, with it opaque 993, eager 920.
- Intel Xeon with AMX: the convolutions run on AMX tiles and BatchNorm is a larger share of the step;
  there Inductor's fused BatchNorm is the faster one: 1,091 images/s against 1,009 opaque, eager 850.

So on CPUs without AMX each BatchNorm is wrapped in an opaque custom op: Inductor still fuses the
element-wise work between the convolutions, and BatchNorm runs ATen's own kernels. On AMX CPUs and
on GPUs Inductor gets the whole graph. ``RESLAB_COMPILE_BATCHNORM=aten`` or ``=inductor`` overrides
the choice (for a CPU where the other one measures faster).

The swap changes the class of each BatchNorm2d in place (same parameters, buffers and state-dict
keys), so optimisers, checkpoints, EMA copies and exported models are unaffected; in eval mode the
module is an ordinary BatchNorm2d.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from .machine import cpu_has_flag

BATCHNORM_CHOICES = ("aten", "inductor")


@torch.library.custom_op("reslab::batch_norm_train", mutates_args=())
def batch_norm_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm without running statistics: (output, batch mean, batch 1/std)."""
    return torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)


@batch_norm_train.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    stats = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("reslab::batch_norm_train_backward", mutates_args=())
def batch_norm_train_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                              invstd: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True, eps,
                                                     [True, True, True])


@batch_norm_train_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
      eps: float) -> tuple[torch.Tensor, ...]:
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _save(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, _bias, eps = inputs
    _out, mean, invstd = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.eps = eps


def _backward(ctx, grad_out: torch.Tensor, _grad_mean: torch.Tensor, _grad_invstd: torch.Tensor) -> tuple:
    x, weight, mean, invstd = ctx.saved_tensors
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    gx, gw, gb = batch_norm_train_backward(grad_out.contiguous(memory_format=fmt), x, weight, mean, invstd, ctx.eps)
    return gx, gw, gb, None


batch_norm_train.register_autograd(_backward, setup_context=_save)


class OpaqueBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode forward is one opaque op to the compiler."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats or self.momentum is None or not self.affine:
            return super().forward(x)
        out, mean, invstd = batch_norm_train(x, self.weight, self.bias, self.eps)
        with torch.no_grad():  # the running statistics, as nn.BatchNorm2d keeps them (unbiased variance)
            n = x.numel() / x.shape[1]
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_((invstd.pow(-2) - self.eps) * (n / max(n - 1, 1)), self.momentum)
            self.num_batches_tracked.add_(1)
        return out


def opaque_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = OpaqueBatchNorm2d
    return model


def batchnorm_backend(device: torch.device) -> str:
    """Who computes a compiled step's training-mode BatchNorm on ``device``: ``aten`` (an opaque op) or
    ``inductor`` (fused with what surrounds it); see the module docstring."""
    asked = os.environ.get("RESLAB_COMPILE_BATCHNORM", "").strip().lower()
    if asked:
        if asked not in BATCHNORM_CHOICES:
            raise ValueError(f"RESLAB_COMPILE_BATCHNORM={asked!r}: choose {' or '.join(BATCHNORM_CHOICES)}")
        return asked
    return "aten" if device.type == "cpu" and not cpu_has_flag("amx_bf16") else "inductor"


def batchnorm_note(device: torch.device) -> str:
    """How a compiled step on ``device`` computes BatchNorm, for the run's log and the benchmark's header."""
    return "BatchNorm fused by Inductor" if batchnorm_backend(device) == "inductor" else "BatchNorm by ATen"


def compile_module(module: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile ``module``, its BatchNorms opaque to Inductor where :func:`batchnorm_backend` says so."""
    if batchnorm_backend(device) == "aten":
        opaque_batchnorm(module)
    return torch.compile(module)
