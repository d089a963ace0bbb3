"""Data-parallel training with PyTorch DDP, launched by ``torchrun`` (``reslab train --nproc N``).

torchrun starts N copies of ``python -m train ...`` and tells each its place through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). The engine calls :func:`context`,
which joins the process group (gloo on CPU, NCCL on GPU). Every rank reads its shard of one shared
permutation (``BatchLoader(rank=, world_size=)``) with a per-rank batch of global batch / N, so a
step sees the same images as a single-process step with the same global batch; gradients are
averaged by DDP. Only rank 0 logs to MLflow and writes checkpoints. Epoch metrics are all-reduced,
so every rank sees the same numbers (and callbacks such as a pruner decide the same way).
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_context() -> Context:
    """Where this process stands, as torchrun's environment says (a single process without it)."""
    return Context(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    return env_context().is_main


def context(device: torch.device) -> tuple[Context, torch.device]:
    """Join torchrun's process group once (gloo on CPU, NCCL on CUDA); return it and this rank's device."""
    ctx = env_context()
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return ctx, device


def shutdown() -> None:
    """Leave the process group cleanly at the end of a command: exiting with it still open can abort
    the process in the collective library's teardown. The barrier first lets every rank finish the
    last message (rank 0's "stop") before any rank closes its connections."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def worker_exit(main: Callable[[], None]) -> None:
    """Run a torchrun worker's ``main`` and end the process without interpreter finalization.

    Gloo's C++ threads can outlive ``destroy_process_group`` by a moment; when the interpreter is torn
    down under them the process dies with SIGABRT ("terminate called without an active exception")
    after a successful run, and torchrun reports the whole job failed (seen once in CI in about 100
    runs). Python's exit handlers still run (MLflow ends its runs there); only the C++ teardown is
    skipped. Errors and ``SystemExit`` codes pass through unchanged.
    """
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def per_rank_batch(batch_size: int, ctx: Context) -> int:
    """Each rank takes an equal share of the global batch, so results match one process."""
    if batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {batch_size} cannot be split over {ctx.world_size} processes; "
                         f"use a multiple of {ctx.world_size}")
    return batch_size // ctx.world_size


def wrap(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """The module that trains: DDP over ``model`` when there are several ranks (``model`` keeps its
    own state dict, without DDP's ``module.`` prefix, for checkpoints and logging)."""
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_sum(values: list[float], ctx: Context, device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity for one process)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sync_buffers(module: nn.Module, ctx: Context) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank before evaluation: each
    rank updated them with its own half-batch, and evaluation must see one model."""
    if ctx.enabled:
        for b in module.buffers():
            dist.broadcast(b, 0)


# --------------------------------------------------------------------------- launching


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the workers must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun_command(nproc: int, argv: list[str], module: str = "train") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *strip_nproc(argv)]


def launch(nproc: int, argv: list[str] | None = None, command: str = "train",
           mask: Callable[[str], str] | None = None) -> None:
    """Re-exec this ``reslab <command>`` through torchrun with ``nproc`` workers (``python -m <command>``:
    ``train`` runs one DDP training, ``tune`` a study whose trials train with DDP).

    Callers check the tracking store first, so a bad store fails in one line before N processes
    start. ``argv`` is the command line after ``reslab`` (default: this process's). ``mask`` hides the
    passwords of URLs in the printed command line (train.redact.mask_secrets; this module imports nothing).
    """
    if env_context().enabled:
        raise ValueError("--nproc given inside a torchrun worker; launch once, either way")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == command:
        argv = argv[1:]
    cmd = torchrun_command(nproc, argv, command)
    line = f"torchrun --standalone --nproc-per-node={nproc} -m {command} " + " ".join(strip_nproc(argv))
    print(f"launching {nproc} data-parallel processes: {(mask or str)(line)}", flush=True)
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def sharded(fn, x, ctx: Context):
    """``fn(x)`` computed in slices, one per rank, and gathered on every rank in order
    (evaluation splits its work instead of repeating it on each rank)."""
    if not ctx.enabled:
        return fn(x)
    per = -(-len(x) // ctx.world_size)
    part = fn(x[ctx.rank * per : (ctx.rank + 1) * per])
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, part.cpu())
    return torch.cat([p for p in parts if p.numel()])
