"""The ``reslab`` command. Packages add subcommands through the ``reslab.commands`` entry-point group,
so ``train`` never imports ``tune`` or ``demo``."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from .allocator import keep_freed_memory
from .config import AUGMENT_CHOICES, FLIP_CHOICES, TTA_VIEWS, TrainConfig, check_bound, load_yaml, recipe
from .data import DATASETS
from .interrupt import EXIT_SIGINT, EXIT_SIGTERM, Terminated, handled, terminate_like_ctrl_c
from .redact import mask_secrets

EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
    """One clear line on stderr, nothing else."""
    print(f"reslab: error: {mask_secrets(message)}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


# --------------------------------------------------------------------------- shared flags


class _DefaultsInHelp:
    """An argument group whose flags' help ends with TrainConfig's real (CIFAR-10) default, so the
    defaults printed by --help are the ones a run uses."""

    def __init__(self, group: Any, defaults: dict[str, Any]) -> None:
        self._group, self._defaults = group, defaults

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        action = self._group.add_argument(*flags, **kwargs)
        value = self._defaults.get(action.dest)
        if value not in (None, "") and not isinstance(value, bool) and "default" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: {value})".strip()
        return action


def _group(p: argparse.ArgumentParser, title: str, defaults: dict[str, Any] | None) -> Any:
    group = p.add_argument_group(title)
    return _DefaultsInHelp(group, defaults) if defaults is not None else group


def _help_defaults(show: bool) -> dict[str, Any] | None:
    """TrainConfig's resolved defaults, computed once per parser (None: leave the help as written)."""
    return TrainConfig().resolved().to_dict() if show else None


def add_data_args(p: argparse.ArgumentParser, show_defaults: bool = True,
                  defaults: dict[str, Any] | None = None) -> None:
    g = _group(p, "data", defaults if defaults is not None else _help_defaults(show_defaults))
    g.add_argument("--dataset", choices=sorted(DATASETS), help="dataset")
    g.add_argument("--data", metavar="PATH", help="zip, image folder, cifar-10-batches-py/, fer2013.csv, or a folder "
                   "holding them (default: $RESLAB_DATA, else ../shared/datasets)")
    g.add_argument("--download", action="store_true", default=None, help="download CIFAR-10 through torchvision")
    g.add_argument("--subset", type=int, metavar="N", help="train on a stratified subset of N images")
    g.add_argument("--val-fraction", type=float, metavar="F", help="validation share carved out of train")


def add_train_args(p: argparse.ArgumentParser, show_defaults: bool = True,
                   model_help: str = "architecture (default: resnet20 for CIFAR-10, resnet9 at width 32 for FER-2013); "
                   "see --list-models") -> None:
    """Flags that map onto :class:`TrainConfig` fields (None means: not given). ``show_defaults``:
    append TrainConfig's defaults to the help (off where a preset or a recipe decides them instead)."""
    defaults = _help_defaults(show_defaults)
    add_data_args(p, show_defaults, defaults)
    g = _group(p, "model", defaults)
    g.add_argument("--model", metavar="NAME", help=model_help)
    g.add_argument("--shortcut", choices=["A", "B"], help="CIFAR ResNet shortcut: A zero-padding (paper), B projection")
    g.add_argument("--ensemble", type=int, metavar="N",
                   help="train N networks of the model side by side (each from its own random start, on the same "
                   "batches, within the same time budget) and log, test and serve them as one: the mean of their "
                   "probabilities; 1: one network")
    g.add_argument("--pretrained", metavar="PATH", help="initialise from a state dict (.pt/.safetensors) or 'torchvision'")
    g.add_argument("--init-from", metavar="MODEL_URI", help="initialise from a logged model, e.g. models:/cifar10-resnet@champion")
    g.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=None,
                   help="start the first convolution as a patch-whitening transform of the training images and keep it "
                   "fixed (airbench's first layer); not with --pretrained/--init-from")
    g = _group(p, "optimisation", defaults)
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    g.add_argument("--time-budget", metavar="DURATION", help="train for this long (e.g. 15m; training + evaluation): "
                   "the schedule's length follows from the speed measured in the first steps, on any CPU or GPU")
    g.add_argument("--min-budget-epochs", type=int, metavar="N", help="with --time-budget: when this machine's measured "
                   "speed buys fewer than N epochs at the model's width, train at half the width (down to 16) until it does: "
                   "a narrower network that sees more epochs learns more in the same minutes (default 0: never; the airbench "
                   "recipe: 5; fast-cpu's FER-2013: 10)")
    g.add_argument("--patience", type=int, metavar="N", help="stop early when validation accuracy has not improved "
                   "for N epochs (default: off)")
    g.add_argument("--restore-best", action="store_true", default=None, help="end with the weights of the epoch with the "
                   "best validation accuracy (the EMA's with --ema), not the last: they are tested, logged and registered")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--optimizer", choices=["sgd", "adamw"])
    g.add_argument("--momentum", type=float)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=None)
    g.add_argument("--weight-decay", type=float, help="applied to weights only, not BN/bias")
    g.add_argument("--bn-bias-lr-scale", type=float, metavar="X",
                   help="BatchNorm shifts learn at X times the learning rate (airbench uses 64 with its BN scales frozen)")
    g.add_argument("--schedule", choices=["onecycle", "cosine", "step", "constant"])
    g.add_argument("--warmup", type=float, metavar="F", help="warm-up share of training")
    g.add_argument("--milestones", type=float, nargs="+", metavar="M", help="step schedule: fractions (<=1) or iterations")
    g.add_argument("--gamma", type=float, metavar="G", help="step schedule: the learning rate is multiplied by G at each "
                   "milestone (default 0.1, the paper's)")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--class-weights", type=float, metavar="POWER",
                   help="weigh each class's loss by (1 / its training images)^POWER, scaled to a mean of 1 per image: "
                   "1 balances the classes, 0.5 half-way (FER-2013's 'disgust' has 436 images, 'happy' 7,215); 0: off")
    g.add_argument("--ema", type=float, metavar="DECAY", help="evaluate an EMA of the weights (e.g. 0.999)")
    g.add_argument("--sam", type=float, metavar="RHO",
                   help="sharpness-aware minimisation: take each step's gradient at the weights moved RHO along it "
                   "(e.g. 0.05); two forward and backward passes a step; 0: off")
    g = _group(p, "augmentation", defaults)
    g.add_argument("--augment", choices=["auto", *AUGMENT_CHOICES],
                   help="auto: crop-flip for cifar10, albumentations for fer2013")
    g.add_argument("--aug-strength", type=float, metavar="S", help="scale of the albumentations magnitudes")
    g.add_argument("--flip", choices=FLIP_CHOICES,
                   help="random (default): each image is mirrored with p=0.5 every epoch; alternate: a random half "
                   "in the first epoch, then each image the other way from its previous epoch (airbench)")
    g.add_argument("--crop-size", type=int, metavar="N",
                   help="train on random NxN crops of each image (FER-2013: 40 of 48 trains 1.4x faster per image); "
                   "evaluation and serving see whole images; 0: whole images")
    g.add_argument("--full-size-finish", type=float, metavar="F",
                   help="with --crop-size: train the last F of the steps (e.g. 0.2) on whole images, the size that "
                   "evaluation and serving see; 0: crops to the end (without crops it changes nothing)")
    g.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="blend each training image with another of its batch, and their labels alike, at a weight "
                   "drawn from Beta(ALPHA, ALPHA) per batch (mixup; e.g. 0.2); 0: off")
    g.add_argument("--workers", type=int, help="augmentation threads")
    g.add_argument("--tta", type=int, nargs="?", const=1, choices=sorted(TTA_VIEWS), metavar="LEVEL",
                   help="test-time augmentation: 1 (--tta alone) averages the image and its mirror, 2 also both "
                   "shifted by a pixel (3x the evaluation time of 1), 0 off")
    g = _group(p, "machine", defaults)
    g.add_argument("--device", help="auto, cpu or cuda[:N]")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: auto, i.e. on for the CIFAR ResNets and their plain "
                   "twins on a bf16 CPU when the run is long enough to repay ~25 s of compilation)")
    g.add_argument("--seed", type=int)
    g = _group(p, "configuration", defaults)
    g.add_argument("--config", metavar="FILE.yaml", help="saved configuration (CLI flags override it)")
    g.add_argument("--recipe", metavar="NAME", help="named recipe from train/recipes/, e.g. fast-cpu")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < recipe < config file < explicit flags."""
    from_file = load_yaml(args.config) if getattr(args, "config", None) else {}
    dataset = args.dataset or from_file.get("dataset") or "cifar10"  # the recipe's section is the dataset's
    merged: dict[str, Any] = {"dataset": dataset}
    if getattr(args, "recipe", None):
        merged.update(recipe(args.recipe, dataset))
        if getattr(args, "model", None) and "model_args" not in from_file and args.model != merged.get("model"):
            merged.pop("model_args", None)  # --model given: the recipe's options for its own network give way
    merged.update(from_file)
    fields = TrainConfig.__dataclass_fields__
    for key, value in vars(args).items():
        if key in fields and value is not None:
            merged[key] = value
    for key in ("epochs", "batch_size", "lr", "weight_decay"):  # 0 (weight decay: below 0) in a file means the
        if getattr(args, key, None) is not None:  # dataset's default; given as a flag, it is a mistake
            check_bound(key, getattr(args, key))
    if getattr(args, "time_budget", None) is not None and getattr(args, "epochs", None):  # the budget set the length
        fail("--time-budget fits the number of epochs to the measured speed: leave out --epochs (--max-steps caps it)")
    if getattr(args, "time_budget", None) is None and (getattr(args, "epochs", None) or getattr(args, "max_steps", None)):
        merged.pop("time_budget", None)  # --epochs/--max-steps given: a recipe's time budget gives way
    if getattr(args, "min_budget_epochs", None) and merged.get("time_budget") is None:
        fail("--min-budget-epochs narrows the network to fit a time budget: give --time-budget (or a recipe with one)")
    if merged.get("time_budget") is None:
        merged.pop("min_budget_epochs", None)  # a recipe's, with its budget given way to --epochs: nothing to fit
    if getattr(args, "epochs", None) and getattr(args, "max_steps", None) is None:
        merged.pop("max_steps", None)  # --epochs given: a recipe's step count gives way too (degradation-paper's 64k)
    if getattr(args, "pretrained", None) or getattr(args, "init_from", None):
        if getattr(args, "whiten", None):
            fail("--whiten sets the first layer from the data, --pretrained/--init-from from weights: choose one")
        merged["whiten"] = False  # weights given: a recipe's whitened first layer gives way (as its budget to --epochs)
    if getattr(args, "shortcut", None):
        merged["model_args"] = {**merged.get("model_args", {}), "shortcut": args.shortcut}
    ensemble = getattr(args, "ensemble", None)
    if ensemble is not None:
        if ensemble < 1:
            fail(f"--ensemble takes the number of networks (1 or more), not {ensemble}")
        if ensemble > 1 and (getattr(args, "pretrained", None) or getattr(args, "init_from", None)):
            fail("--ensemble's networks each start from their own random weights: leave out --pretrained/--init-from")
        model_args = {**merged.get("model_args", {}), "ensemble": ensemble}
        if ensemble == 1:  # one network: a recipe's ensemble gives way, and the logged arguments stay as ever
            model_args.pop("ensemble")
        merged["model_args"] = model_args
    cfg = TrainConfig.from_dict(merged).resolved()
    from .models import list_models  # torch loads only when a command needs it
    from .stopping import check as check_stopping

    check_stopping(cfg)  # bad --patience/--restore-best values before any data is loaded

    if cfg.model not in list_models():
        fail(f"unknown model {cfg.model!r}; run `reslab train --list-models`")
    from .data import DATASETS
    from .engine import select_device
    from .models import check_model_args

    try:
        check_model_args(cfg.model, cfg.model_args)
        select_device(cfg.device)
        if info := DATASETS.get(cfg.dataset):  # a --crop-size larger than the images, before anything starts
            cfg.check_image_size(info.image_size)
    except ValueError as e:
        fail(str(e))
    if cfg.subset is not None and cfg.subset < 10:
        fail(f"--subset {cfg.subset} is too small; give at least 10 images")
    return cfg


# --------------------------------------------------------------------------- reslab train


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one ResNet and log it to MLflow",
        description="Train one network on CIFAR-10 or FER-2013; log config, curves, test metrics and the model "
        "to MLflow (./mlruns by default, or $MLFLOW_TRACKING_URI). Defaults shown are CIFAR-10's.",
    )
    add_train_args(p)
    g = p.add_argument_group("tracking")
    g.add_argument("--experiment", help="MLflow experiment (default: the dataset name)")
    g.add_argument("--run-name", help="MLflow run name")
    g.add_argument("--register", metavar="NAME", help="register the model as a new version of NAME (e.g. cifar10-resnet)")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="where last.pt is written every epoch (default checkpoints/<run>)")
    g.add_argument("--resume", metavar="CKPT", help="continue an interrupted run from its checkpoint (file or folder)")
    g.add_argument("--nproc", type=int, default=1, help="data-parallel processes (torchrun)")
    p.add_argument("--list-models", action="store_true", help="print the registered architectures and exit")
    p.set_defaults(func=cmd_train)


def command_tags(args: argparse.Namespace) -> dict[str, str]:
    """How the run was started, for its result file (``reslab results export``): the command line as typed
    (passwords masked) and the recipe, which the flat params do not show."""
    argv = getattr(args, "argv", None)
    tags = {"recipe": args.recipe} if args.recipe else {}
    if argv is not None:
        tags["command"] = mask_secrets("reslab " + shlex.join(argv))
    return tags


RESUME_OVERRIDES = ("device", "data", "download", "progress")  # may change on --resume (a GPU gone, a moved dataset)
RESUME_IGNORES = ("recipe", "config", "shortcut", "ensemble", "init_from", "experiment", "run_name", "checkpoint_dir")


def check_resume_flags(args: argparse.Namespace) -> None:
    """--resume continues the run as its checkpoint holds it (that is what makes it exact): a flag that would
    change what it trains, or where it logs, is one line instead of being accepted and silently dropped."""
    given = [k for k, v in vars(args).items() if v is not None and k not in RESUME_OVERRIDES
             and (k in TrainConfig.__dataclass_fields__ or k in RESUME_IGNORES)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        fail(f"--resume continues the run exactly as its checkpoint holds it: leave out {flags} "
             "(only --device, --data, --download and --no-progress may change; to train longer, start a new run from its logged model "
             "with --init-from runs:/<run id>/model)")


def cmd_train(args: argparse.Namespace) -> None:
    if args.list_models:
        from .models import list_models

        print("\n".join(list_models()))
        return
    from .run import train_and_log  # heavy imports only when training

    # MLflow reads files of the just-logged model back (one-file downloads): no bars for files already here
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    if args.resume:
        from .engine import load_checkpoint

        check_resume_flags(args)
        ck = load_checkpoint(args.resume)
        cfg = TrainConfig.from_dict(ck["config"])
        for key in RESUME_OVERRIDES:  # where it runs and what it shows may change; what it trains may not
            if getattr(args, key, None) is not None:
                setattr(cfg, key, getattr(args, key))
        ckdir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        cfg.checkpoint_dir = str(ckdir)
        run_name = ck.get("meta", {}).get("run_name")
        run_id = ck.get("meta", {}).get("mlflow_run_id")
    else:
        cfg = config_from_args(args)
        run_name = args.run_name or f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg.checkpoint_dir = args.checkpoint_dir or str(Path("checkpoints") / run_name)
        run_id = None
    if args.nproc < 1:
        fail("--nproc must be at least 1")
    if args.nproc > 1:
        from .distributed import launch
        from .tracking import setup_tracking

        setup_tracking()  # a bad store fails in one line before N processes start
        launch(args.nproc, getattr(args, "argv", None), mask=mask_secrets)
        return
    from .distributed import shutdown

    train_and_log(cfg, experiment=args.experiment, run_name=run_name, register=args.register,
                  resume=args.resume, init_from=args.init_from, run_id=run_id, tags=command_tags(args))
    shutdown()  # under torchrun: leave the process group before exiting


# --------------------------------------------------------------------------- reslab ui


def add_ui_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="open the MLflow UI over reslab's store",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)


def ui_command(host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command over reslab's store and the environment to run it in."""
    from .tracking import default_tracking_uri, mlruns_dir, server_environment

    uri = default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        fail(f"MLFLOW_TRACKING_URI is a server ({uri}): open it in a browser instead")
    mlruns_dir().mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--default-artifact-root", (mlruns_dir() / "artifacts").as_uri(),
            "--host", host, "--port", str(port), "--workers", "1"], server_environment()


def port_problem(host: str, port: int) -> str | None:
    """Why a server (``reslab ui``, ``reslab demo``) cannot listen on host:port, or None. Checked before it
    starts, so a port in use is a one-line error within a second, not a traceback after the start-up."""
    if not 0 <= port <= 65535:
        return f"--port {port} is not a port number (0-65535)"
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        return f"cannot resolve --host {host} ({e})"
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use; choose another --port, or stop what is serving there"
            return f"cannot serve on {host}:{port} ({e.strerror or e}); choose another --port or --host"
    return None


def cmd_ui(args: argparse.Namespace) -> None:
    problem = port_problem(args.host, args.port)
    if problem:
        fail(problem)
    cmd, env = ui_command(args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port}  (store: {mask_secrets(cmd[5])}); Ctrl+C to stop", flush=True)
    try:
        raise SystemExit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- main


def one_line_warnings() -> None:
    """reslab's own warnings (images skipped, a corrupt last.pt fallen back from) as one line each,
    ``reslab: warning: ...``, passwords masked; other libraries' warnings keep Python's format."""
    from .errors import ReslabWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, ReslabWarning):
            print(f"reslab: warning: {mask_secrets(str(message))}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab",
        description="Train, tune and serve residual networks on CIFAR-10 and FER-2013, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registrars: list[tuple[str, Callable]] = []
    for ep in sorted(entry_points(group="reslab.commands"), key=lambda e: e.name):
        try:
            registrars.append((ep.name, ep.load()))
        except (ImportError, AttributeError) as e:  # a broken package must not take the others down
            print(f"reslab: warning: command {ep.name!r} unavailable ({e})", file=sys.stderr)
    if not registrars:  # running from a source tree that was never installed
        registrars = [("train", add_train_command), ("ui", add_ui_command)]
    for _, register in registrars:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    keep_freed_memory()  # every reslab process trains (or serves) with the allocator set up for tensors
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc re-runs under torchrun
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(EXIT_USAGE)
    from .errors import user_errors

    if getattr(args, "no_progress", False):  # nor MLflow's download bars (train, tune, compare, bench: always off)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    terminate_like_ctrl_c()  # docker stop, systemd, schedulers: runs end KILLED, not left RUNNING
    one_line_warnings()
    try:
        args.func(args)
    except user_errors() as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:  # disk full, read-only folder: the machine's state, not a bug
        if os.environ.get("RESLAB_DEBUG"):
            raise
        fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else (str(e).splitlines() or [repr(e)])[0])
    except KeyboardInterrupt as e:
        handled()
        print("\nterminated (SIGTERM)" if isinstance(e, Terminated) else "\ninterrupted", file=sys.stderr)
        raise SystemExit(EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT) from None


if __name__ == "__main__":
    main()
