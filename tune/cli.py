"""``reslab tune``: an Optuna study over training runs, tracked in MLflow, best model registered."""

from __future__ import annotations

import argparse
import os
import re
import time
from typing import Any

from train.cli import add_train_args, config_from_args, fail

# `make run`: a short CIFAR-10 study sized for about 15 minutes on a 2-core CPU. The search stops
# starting trials after 12 minutes; the last trial, the test evaluation and registration follow.
PRESETS: dict[str, dict[str, Any]] = {
    # measured on an idle 2-core CPU: a 5,000-image x 4-epoch trial took 21 s, so 10,000 x 6 (most trials pruned early) fills ~15 minutes
    "make-run": {"dataset": "cifar10", "model": "resnet20", "subset": 10000, "epochs": 6, "trials": 30,
                 "timeout": "13m", "prune_after": 3, "study_prefix": "make-run"},
}


def parse_duration(text: str) -> float:
    """Seconds from '7200', '90s', '30m', '2h' or '1h30m'."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"--timeout {text!r}: expected seconds or a duration like 90s, 30m, 2h, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def check_batch_split(space: Any, batch_size: int, nproc: int) -> None:
    """Every batch size a trial may get must split evenly over the processes (a global batch)."""
    from optuna.distributions import CategoricalDistribution

    dist = space.distributions.get("batch_size")
    if dist is None:
        sizes = [space.fixed.get("batch_size", batch_size)]
    elif isinstance(dist, CategoricalDistribution):
        sizes = list(dist.choices)
    else:
        fail("--nproc needs batch sizes as a list of choices in --space (each a multiple of --nproc)")
    bad = [b for b in sizes if int(b) % nproc]
    if bad:
        fail(f"batch size(s) {bad} cannot be split over --nproc {nproc} processes; search multiples of {nproc} (--space)")


def add_tune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="search hyperparameters with Optuna; track trials in MLflow; register the best model",
        description="Search learning rate, batch size and weight decay (or any --space) with a seeded TPE sampler, "
        "pruning poor trials on per-epoch validation accuracy. Each trial is a nested MLflow run under the study's "
        "parent run; the best model is evaluated once on the test split and registered as <dataset>-resnet "
        "(alias champion if it beats the current champion's test accuracy, else challenger). Several workers "
        "may run the same --study on a shared --storage.",
    )
    add_train_args(p)
    g = p.add_argument_group("study")
    g.add_argument("--study", metavar="NAME", help="study name; an existing study is resumed and extended "
                   "(default: <dataset>-<model>-<time>)")
    g.add_argument("--storage", metavar="URL", help="Optuna storage: sqlite:///f.db, postgresql+psycopg://user@host/db, "
                   "or a journal .log path (default: journal file mlruns/optuna/journal.log)")
    g.add_argument("--trials", type=int, metavar="N", help="trial budget of this invocation, shared by all its workers (default 20)")
    g.add_argument("--timeout", metavar="DURATION", help="stop starting trials after this long, e.g. 90m or 2h")
    g.add_argument("--space", metavar="FILE.yaml", help="add or override searched dimensions (see README, Hyperparameter search)")
    g.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median", help="(default: median)")
    g.add_argument("--prune-after", type=int, metavar="N", help="completed trials before the median pruner acts (default 3)")
    g.add_argument("--prune-warmup", type=int, default=1, metavar="EPOCHS",
                   help="epochs every trial gets before it may be pruned (default 1)")
    g.add_argument("--heartbeat", type=int, metavar="SECONDS", help="RDB storages: fail and retry trials of workers "
                   "silent for 2x this long")
    g.add_argument("--refit", action="store_true", help="retrain the best configuration on train+val before testing it")
    g.add_argument("--no-register", dest="register", action="store_false", help="do not test or register the best model")
    g.add_argument("--experiment", help="MLflow experiment (default: the dataset name)")
    g.add_argument("--nproc", type=int, default=1, metavar="N", help="train every trial data-parallel on N processes "
                   "(torchrun; DDP over gloo on CPU, NCCL on GPUs); the batch size is the global one (default 1)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="make-run: a ~15-minute CIFAR-10 study on 2 CPU cores "
                   "(10000-image subset, 6 epochs per trial, 30 trials or 13 minutes of search)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> None:
    from .space import SearchSpace
    from .study import TuneOptions, run_study

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per trial, not per download
    preset = dict(PRESETS.get(args.preset or "", {}))
    for key in ("dataset", "model", "subset", "epochs", "trials", "timeout", "prune_after"):
        if getattr(args, key, None) is None and key in preset:
            setattr(args, key, preset[key])
    base = config_from_args(args)
    if base.val_fraction <= 0:
        fail("tuning needs a validation split: --val-fraction must be above 0")
    if args.trials is not None and args.trials < 1:
        fail("--trials must be at least 1")
    if args.init_from:
        from train.tracking import model_files, setup_tracking

        setup_tracking()
        base.pretrained = str(model_files(args.init_from)[1])
    space = SearchSpace.build(base.optimizer, args.space)
    if args.nproc < 1:
        fail("--nproc must be at least 1")
    if args.nproc > 1:
        check_batch_split(space, base.batch_size, args.nproc)
    prefix = preset.get("study_prefix", f"{base.dataset}-{base.model}")
    opts = TuneOptions(
        base=base, space=space, study=args.study or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage=args.storage, trials=args.trials or 20,
        timeout=parse_duration(str(args.timeout)) if args.timeout else None,
        pruner=args.pruner, prune_after=3 if args.prune_after is None else args.prune_after,
        prune_warmup=args.prune_warmup, heartbeat=args.heartbeat, refit=args.refit, register=args.register,
        experiment=args.experiment, progress=base.progress,
    )
    if args.nproc > 1:
        from train.distributed import launch

        if not args.study:  # every worker process of the launch must join the same study
            args.argv = [*args.argv, "--study", opts.study]
        launch(args.nproc, args.argv, "tune")
        return
    t0 = time.perf_counter()
    out = run_study(opts)
    # a worker that lost the race to finalize has no "registered" key: another worker registers
    if out.get("finalized_by") and opts.register and "registered" in out and not out["registered"]:
        fail(f"no trial of study {opts.study} completed, so nothing was registered (see the trials' fail_reason)")
    if args.preset == "make-run" and out.get("registered"):
        reg = out["registered"]
        print(f"\nmake run finished in {(time.perf_counter() - t0) / 60:.1f} min: {reg['name']} version {reg['version']} "
              f"({reg.get('alias', 'registered earlier')})\n"
              "  browse the study and the registry:  reslab ui    (or: make ui)   then open http://127.0.0.1:5000\n"
              f"  try the model in a browser:         reslab demo  (or: make demo)  serves models:/{reg['name']}@champion")
