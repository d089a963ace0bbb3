"""``reslab tune``: an Optuna study over training runs, tracked in MLflow, best model registered."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from train.budget import format_duration, parse_duration
from train.cli import add_train_args, config_from_args, fail
from train.config import RECIPES_DIR, load_yaml

from .budget import FULL_TRIALS

# Presets of whole tuning runs, as recipe files (train/recipes/<name>.yaml, section `tune`).
PRESETS = ("make-run",)


def tune_preset(name: str) -> dict[str, Any]:
    return load_yaml(RECIPES_DIR / f"{name}.yaml")["tune"]


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
        description="Search learning rate, batch size and weight decay (or any --space) around the dataset's fast "
        "recipe (unless --model, --recipe or --config names another base) with a seeded TPE sampler, "
        "pruning poor trials on per-epoch validation accuracy. Each trial is a nested MLflow run under the study's "
        "parent run; the best model is evaluated once on the test split and registered as <dataset>-resnet "
        "(alias champion if it beats the current champion's test accuracy, else challenger). Several workers "
        "may run the same --study on a shared --storage.",
    )
    # the base is the dataset's fast recipe (train/recipes/fast-cpu.yaml), not TrainConfig's defaults: none shown
    add_train_args(p, show_defaults=False, model_help="architecture (default: resnet9 at width 32, the fast-cpu "
                   "recipe's, which --model, --recipe or --config replaces; `reslab train --list-models` lists them)")
    g = p.add_argument_group("study")
    g.add_argument("--study", metavar="NAME", help="study name; an existing study is resumed and extended "
                   "(default: <dataset>-<model>-<time>)")
    g.add_argument("--storage", metavar="URL", help="Optuna storage: sqlite:///f.db, postgresql+psycopg://user@host/db, "
                   "or a journal .log path (default: journal file mlruns/optuna/journal.log)")
    g.add_argument("--trials", type=int, metavar="N", help="trial budget of this invocation, shared by all its workers (default 20; 30 with --budget)")
    g.add_argument("--timeout", metavar="DURATION", help="stop starting trials after this long, e.g. 90m or 2h")
    g.add_argument("--budget", metavar="DURATION", help="wall-clock budget of the whole invocation, e.g. 10m: this "
                   "machine's speed is measured, trials are sized to a quarter of it (low fidelity, successive "
                   "halving), the best configuration is refit on all training images in the rest, tested and registered; "
                   "a budget too short for a search that ranks anything refits the base configuration for all of it")
    g.add_argument("--min-search-trials", type=int, metavar="N",
                   help=f"with --budget: search only if N trials of the smallest useful size (3 epochs of 4,000 images) "
                   f"fit in its quarter, else refit the base configuration for the whole budget; 0 always searches "
                   f"(default {FULL_TRIALS})")
    g.add_argument("--space", metavar="FILE.yaml", help="add or override searched dimensions (see docs/tuning-reference.md)")
    g.add_argument("--pruner", choices=["asha", "median", "hyperband", "none"],
                   help="asha: successive halving over epochs; median: below the median of earlier trials at the same "
                   "epoch (default: asha with --budget, else median)")
    g.add_argument("--prune-after", type=int, metavar="N", help="completed trials before the median pruner acts (default 3)")
    g.add_argument("--prune-warmup", type=int, default=1, metavar="EPOCHS",
                   help="epochs every trial gets before it may be pruned; asha's and hyperband's first rung (default 1)")
    g.add_argument("--heartbeat", type=int, metavar="SECONDS", help="RDB storages: fail and retry trials of workers "
                   "silent for 2x this long")
    g.add_argument("--refit", action="store_true", help="retrain the best configuration on train+val before testing it")
    g.add_argument("--no-register", dest="register", action="store_false", help="do not test or register the best model")
    g.add_argument("--experiment", help="MLflow experiment (default: the dataset name)")
    g.add_argument("--nproc", type=int, default=1, metavar="N", help="train every trial data-parallel on N processes "
                   "(torchrun; DDP over gloo on CPU, NCCL on GPUs); the batch size is the global one (default 1)")
    g.add_argument("--preset", choices=PRESETS, help="make-run: a CIFAR-10 study, then a FER-2013 study, in "
                   "20 minutes of wall clock on any machine (--budget changes it), each registering <dataset>-resnet")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per trial, not per download
    if not args.preset:
        tune_one(args)
        return
    preset = tune_preset(args.preset)
    if args.nproc > 1:
        fail("--preset runs one process per study; for DDP trials run `reslab tune --dataset D --budget T --nproc N`")
    shares: dict[str, float] = preset["shares"] if not args.dataset else {args.dataset: 1.0}
    total = parse_duration(args.budget or preset["budget"])
    t0 = time.time()
    rows = []
    for i, dataset in enumerate(shares):
        left = sum(list(shares.values())[i:])  # a study that ran long shrinks the ones after it, not the total
        budget = max(30.0, (t0 + total - time.time()) * shares[dataset] / left)
        print(f"\n=== {args.preset}: {dataset} ({i + 1}/{len(shares)}), budget {budget / 60:.1f} min "
              f"({format_duration(t0 + total - time.time())} left of the whole run's {format_duration(total)}) ===", flush=True)
        sub = argparse.Namespace(**{**vars(args), "dataset": dataset, "budget": str(round(budget)),
                                    "study": args.study and f"{args.study}-{dataset}"})
        rows.append(tune_one(sub, f"{preset['study_prefix']}-{dataset}"))
    print(f"\n{args.preset} finished in {(time.time() - t0) / 60:.1f} min (budget {total / 60:.0f} min)\n")
    print(summary_table(rows))
    print("\n  browse the studies and the registry:  reslab ui    (or: make ui)   then open http://127.0.0.1:5000\n"
          "  try the champions in a browser:      reslab demo  (or: make demo)  serves "
          + " and ".join(f"models:/{r['name']}@champion" for r in rows if r.get("name")))


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The closing table of a preset: one row per dataset's study."""
    head = ["dataset", "trials complete/pruned/failed", "best lr / batch / wd", "trial val acc (low fidelity)", "test acc",
            "registered", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.get("trained") or {}
        hp = f"{t['lr']:.3g} / {t['batch_size']} / {t['weight_decay']:.2g}" if t else "-"
        acc = f"{r['test_acc']:.4f}" if r.get("test_acc") is not None else "-"
        val = f"{r['val_acc']:.4f}" if r.get("val_acc") is not None else "-"
        reg = f"{r['name']} v{r['version']} ({r.get('alias', '-')})" if r.get("name") else "nothing"
        lines.append(f"| {r['dataset']} | {r['counts']} | {hp} | {val} | {acc} | {reg} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def tune_one(args: argparse.Namespace, prefix: str | None = None) -> dict[str, Any]:
    """One study invocation (or its launch under torchrun); returns a row for the preset's table."""
    from .space import SearchSpace
    from .study import TuneOptions, run_study

    t0 = time.time()
    if args.model is None and args.recipe is None and args.config is None:
        args.recipe = "fast-cpu"  # trials start from the dataset's fast recipe unless another base is named
    if args.min_budget_epochs:
        fail("--min-budget-epochs is for `reslab train --time-budget`: tune sizes its trials, and --budget its refits, itself")
    base = config_from_args(args)
    base.min_budget_epochs = 0  # a recipe's (airbench): tune/budget.py narrows its short refits by its own rule
    if args.tta is None and base.tta > 1:  # a recipe's shifted views triple each trial's validation for ~0.2
        base.tta = 1  # points, well inside the selection's noise: trials buy epochs with that time instead
    if base.val_fraction <= 0:
        fail("tuning needs a validation split: --val-fraction must be above 0")
    if args.trials is not None and args.trials < 1:
        fail("--trials must be at least 1")
    if args.budget and args.timeout:
        fail("--budget plans the whole invocation; leave out --timeout")
    budget = parse_duration(str(args.budget)) if args.budget else None
    timeout = parse_duration(str(args.timeout)) if args.timeout else None
    if timeout is not None and timeout <= 0:
        fail("--timeout must be above 0")
    if budget is not None and budget <= 0:
        fail("--budget must be above 0")
    if budget is not None and base.subset is not None:
        fail(f"--budget sizes its trials' subsets and refits on every training image: give no subset (here {base.subset}, "
             "from --subset or a recipe's or --config's `subset`); point --data at a smaller copy to tune on less")
    if args.min_search_trials is not None and (budget is None or args.min_search_trials < 0):
        fail("--min-search-trials needs --budget" if budget is None else "--min-search-trials must be 0 (always search) or more")
    if args.init_from:
        from train.tracking import model_files, setup_tracking

        setup_tracking()
        base.pretrained = str(model_files(args.init_from)[1])
    space = SearchSpace.build(base, args.space)
    if budget is not None and (sized := sorted({"epochs", "subset", "max_steps", "time_budget"} & space.from_file)):
        fail(f"--budget sizes its trials itself: leave {', '.join(sized)} out of the --space file")
    if args.nproc < 1:
        fail("--nproc must be at least 1")
    if args.nproc > 1:
        check_batch_split(space, base.batch_size, args.nproc)
    prefix = prefix or f"{base.dataset}-{base.model}"
    opts = TuneOptions(
        base=base, space=space, study=args.study or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage=args.storage, trials=args.trials or (30 if budget else 20),
        timeout=timeout,
        pruner=args.pruner or ("asha" if budget else "median"), prune_after=3 if args.prune_after is None else args.prune_after,
        prune_warmup=args.prune_warmup, heartbeat=args.heartbeat, refit=args.refit or budget is not None,
        register=args.register, experiment=args.experiment, progress=base.progress, budget=budget, started=t0,
        min_search_trials=FULL_TRIALS if args.min_search_trials is None else args.min_search_trials,
    )
    if args.nproc > 1:
        from train.distributed import launch
        from train.tracking import setup_tracking

        setup_tracking()  # a bad store fails in one line before N processes start
        if not args.study:  # every worker process of the launch must join the same study
            args.argv = [*args.argv, "--study", opts.study]
        from train.redact import mask_secrets

        launch(args.nproc, args.argv, "tune", mask=mask_secrets)
        return {"dataset": base.dataset, "counts": "-", "minutes": (time.time() - t0) / 60}
    out = run_study(opts)
    # a worker that lost the race to finalize has no "registered" key: another worker registers
    if out.get("finalized_by") and opts.register and "registered" in out and not out["registered"]:
        fail(f"no trial of study {opts.study} completed, so nothing was registered (see the trials' fail_reason)")
    counts = out.get("summary", {}).get("counts", {})
    reg = out.get("registered") or {}
    return {"dataset": base.dataset, "study": opts.study, "minutes": (time.time() - t0) / 60,
            "counts": f"{counts.get('complete', 0)}/{counts.get('pruned', 0)}/{counts.get('fail', 0)}"
            if out.get("searched", True) else "no search (budget too short)", **reg}
