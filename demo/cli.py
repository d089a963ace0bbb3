"""``reslab demo``'s command line, kept free of heavy imports (Gradio loads only when the app starts)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys

from train.config import champion_uri
from train.data import DATASETS

from .settings import BATCH_SIZE, QUEUE_SIZE, UPLOAD_LIMIT, serving_threads

AUTH_ENV = "RESLAB_DEMO_AUTH"  # USER:PASSWORD, instead of --auth (which other users can see in `ps`)


# What a flag of one mode is when not given (None in argparse, so that giving it to the other mode, which would
# ignore it, can be refused): serving's, then --bench's.
SERVE_DEFAULTS = {"model": None, "host": "127.0.0.1", "port": 7860, "share": False, "auth": None, "mlflow_ui": None}
BENCH_DEFAULTS = {"model_uri": None, "dataset": "cifar10", "requests": 50, "warmup": 5, "concurrent": 50, "gradcam": True,
                  "timeout": 120.0, "out": None}


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="serve the registered champion models in a web app (Gradio)",
        description="Start a Gradio app with one tab per dataset whose registered model has the `champion` alias "
        f"({', '.join(champion_uri(d) for d in DATASETS)}): predictions, Grad-CAM, faces, model card.",
    )
    p.add_argument("--model", action="append", metavar="[DATASET=]URI",
                   help="serve this model instead of the dataset's champion, e.g. models:/cifar10-resnet/3 or "
                   "fer2013=models:/fer2013-resnet@challenger (repeatable)")
    p.add_argument("--host", help="interface to bind (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="port to serve on (default: 7860)")
    p.add_argument("--share", action="store_true", default=None, help="also open a public gradio.live link")
    p.add_argument("--auth", metavar="USER:PASSWORD", default=None,
                   help=f"require this login (default: ${AUTH_ENV} if set); advised with --host other than "
                   "127.0.0.1 or --share")
    p.add_argument("--mlflow-ui", metavar="URL", help="MLflow UI to link the model card to "
                   "(default: http://127.0.0.1:5000 if one answers there, e.g. `reslab ui`)")
    p.add_argument("--max-file-size", default=UPLOAD_LIMIT, help=f"largest upload accepted (default: {UPLOAD_LIMIT})")
    p.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help=f"requests allowed to wait in the queue (default: {QUEUE_SIZE})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"most uploads merged into one forward pass (default: {BATCH_SIZE})")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads for the forward passes (default: half "
                   f"the CPU cores, at least 1, here {serving_threads()}; the other cores serve HTTP)")
    p.add_argument("--no-examples", dest="examples", action="store_false", help="skip the test-split examples")
    b = p.add_argument_group(
        "benchmark (--bench)", "measure end-to-end HTTP latency instead of serving: start `reslab demo` as a process on "
        "127.0.0.1 and a free port (with --batch-size and --queue-size), send it real test images as the page does "
        "(upload, queue, event stream), one at a time and then all at once, print a table and stop it")
    b.add_argument("--bench", action="store_true", help="run the benchmark instead of serving")
    b.add_argument("--model-uri", help="model to serve and measure (default: the --dataset's champion)")
    b.add_argument("--dataset", choices=sorted(DATASETS),
                   help="whose champion --model-uri defaults to (default: cifar10)")
    b.add_argument("--requests", type=int, help="timed requests one at a time (default: 50)")
    b.add_argument("--warmup", type=int, help="untimed requests first (default: 5)")
    b.add_argument("--concurrent", type=int, help="requests sent at once after those (default: 50; 0: none)")
    b.add_argument("--no-gradcam", dest="gradcam", action="store_false", default=None,
                   help="ask without Grad-CAM (default: with it, as the page's checkbox is on)")
    b.add_argument("--timeout", type=float, help="seconds one request may take (default: 120)")
    b.add_argument("--out", metavar="FILE.json", help="write every latency and the machine's details as JSON")
    p.set_defaults(func=cmd_demo)


def fill_mode_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults of serving's and --bench's flags; a flag of the other mode, which it would ignore, is
    a ValueError (``--bench --model URI`` benchmarked the champion instead)."""
    other = SERVE_DEFAULTS if args.bench else BENCH_DEFAULTS
    given = [k for k in other if getattr(args, k) is not None]
    if given:
        flags = ", ".join("--no-gradcam" if k == "gradcam" else "--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags}: not for --bench, which serves --model-uri itself on 127.0.0.1 and a free port"
                         if args.bench else f"{flags}: for --bench only (--model chooses what the app serves)")
    for k, v in {**SERVE_DEFAULTS, **BENCH_DEFAULTS}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` as Gradio's auth pair; raises ValueError when it is not that."""
    if value is None or value == "":
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth (or $RESLAB_DEMO_AUTH) must be USER:PASSWORD, both non-empty")
    return user, password


def is_loopback(host: str) -> bool:
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, share: bool, auth: tuple[str, str] | None) -> str | None:
    """The warning printed when the demo can be reached from other machines with no login."""
    if auth is not None or (is_loopback(host) and not share):
        return None
    where = "a public gradio.live link" if share else f"{host}, reachable from other machines"
    return (f"reslab demo: warning: serving on {where} with no login; anyone who reaches it can use the "
            f"models. Set --auth USER:PASSWORD (or ${AUTH_ENV}).")


def cmd_demo(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from train.cli import fail, port_problem

    if args.threads is not None and args.threads < 1:
        fail(f"--threads {args.threads}: give 1 or more")
    if args.batch_size < 1 or args.queue_size < 1:
        fail(f"--batch-size and --queue-size take 1 or more (here {args.batch_size} and {args.queue_size})")
    if not re.fullmatch(r"\s*[1-9]\d*\s*[kmgt]?b\s*", str(args.max_file_size), re.IGNORECASE):
        fail(f"--max-file-size {args.max_file_size}: give a size above 0 with its unit, e.g. 500kb, 10mb or 1gb")
    args.threads = args.threads or serving_threads()  # resolved once: the server and --bench's record read it
    try:
        fill_mode_defaults(args)
    except ValueError as e:
        fail(str(e))
    if args.bench:
        from .bench import cmd_bench

        cmd_bench(args)
        return

    problem = port_problem(args.host, args.port)
    if problem:
        fail(problem)
    try:
        auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
    except ValueError as e:
        fail(str(e))
    warning = exposure_warning(args.host, args.share, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)

    from train.tracking import setup_tracking

    import logging

    from .app import Missing, build_app, launch, load_models

    handler = logging.StreamHandler()  # refused and failed requests, with details, on the server's stderr
    handler.setFormatter(logging.Formatter("reslab demo: %(levelname)s: %(message)s"))
    logging.getLogger("reslab.demo").addHandler(handler)
    logging.getLogger("reslab.demo").setLevel(logging.INFO)
    from .serving import find_mlflow_ui

    import torch

    torch.set_num_threads(args.threads)
    uri = setup_tracking()
    print(f"loading models from {uri} ... (forward passes on {torch.get_num_threads()} torch thread(s))", flush=True)
    entries = load_models(args.model)
    for e in entries:
        print(f"  {e.dataset}: " + (e.message.replace("`", "") if isinstance(e, Missing) else
                                    f"{e.card.name or e.uri} v{e.card.version} ({e.config.get('architecture')})"))
    app = build_app(entries, find_mlflow_ui(args.mlflow_ui), args.batch_size, args.examples, args.queue_size)
    try:
        launch(app, args.host, args.port, args.share, args.max_file_size, auth=auth)
    except OSError as e:  # taken while the models loaded (Gradio's "Cannot find empty port"), or unbindable
        if "Cannot find empty port" in str(e):
            fail(f"port {args.port} on {args.host} is already in use; choose another --port, or stop what is serving there")
        fail(f"cannot serve on {args.host}:{args.port} ({str(e).splitlines()[0]}); choose another --port or --host")
