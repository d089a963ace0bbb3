"""``reslab demo``'s command line, kept free of heavy imports (Gradio loads only when the app starts)."""

from __future__ import annotations

import argparse
import os

UPLOAD_LIMIT = "10mb"
QUEUE_SIZE = 64  # waiting requests beyond this are refused with "queue full" instead of piling up
BATCH_SIZE = 16  # uploads merged into one forward pass
CHAMPIONS = ("models:/cifar10-resnet@champion", "models:/fer2013-resnet@champion")


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="serve the registered champion models in a web app (Gradio)",
        description="Start a Gradio app with one tab per dataset whose registered model has the `champion` alias "
        f"({', '.join(CHAMPIONS)}): predictions, Grad-CAM, faces, model card.",
    )
    p.add_argument("--model", action="append", metavar="[DATASET=]URI",
                   help="serve this model instead of the dataset's champion, e.g. models:/cifar10-resnet/3 or "
                   "fer2013=models:/fer2013-resnet@challenger (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--mlflow-ui", metavar="URL", help="MLflow UI to link the model card to "
                   "(default: http://127.0.0.1:5000 if one answers there, e.g. `reslab ui`)")
    p.add_argument("--max-file-size", default=UPLOAD_LIMIT, help=f"largest upload accepted (default: {UPLOAD_LIMIT})")
    p.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help=f"requests allowed to wait in the queue (default: {QUEUE_SIZE})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"most uploads merged into one forward pass (default: {BATCH_SIZE})")
    p.add_argument("--no-examples", dest="examples", action="store_false", help="skip the test-split examples")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from train.cli import fail
    from train.tracking import setup_tracking

    from .app import Missing, build_app, launch, load_models
    from .serving import find_mlflow_ui

    uri = setup_tracking()
    print(f"loading models from {uri} ...", flush=True)
    entries = load_models(args.model)
    for e in entries:
        print(f"  {e.dataset}: " + (e.message.replace("`", "") if isinstance(e, Missing) else
                                    f"{e.card.name or e.uri} v{e.card.version} ({e.config.get('architecture')})"))
    app = build_app(entries, find_mlflow_ui(args.mlflow_ui), args.batch_size, args.examples, args.queue_size)
    try:
        launch(app, args.host, args.port, args.share, args.max_file_size)
    except OSError as e:  # Gradio's "Cannot find empty port", or an address that cannot be bound
        fail(f"cannot serve on {args.host}:{args.port} ({str(e).splitlines()[0]}); choose another --port or --host")
