"""``reslab import``, ``reslab evaluate`` and ``reslab export``: using a model outside training
(docs/using-models.md). ``reslab predict`` lives in demo/ (it reuses the demo's face finder)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .cli import fail
from .config import TTA_VIEWS
from .data import DATASETS, spread_sample
from .files import output_path, write_text_atomic

MODEL_HELP = ("a logged model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a run id, "
              "or a downloaded model folder")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=sorted(DATASETS), help="dataset (default: the one the model was trained on)")
    p.add_argument("--data", metavar="PATH", help="the dataset (zip, image folder with train/ and test/, cifar-10-batches-py/, "
                   "fer2013.csv, or a folder holding them; default: $RESLAB_DATA, else ../shared/datasets), or a folder of "
                   "your own labelled images, one sub-folder per class named as the model's classes")


def _open(model: str):
    from .tracking import setup_tracking
    from .usemodel import open_model

    setup_tracking()
    return open_model(model)


def _load_data(opened, args: argparse.Namespace):
    """The dataset's test split, or a folder of the user's own labelled images (<class>/<image>)."""
    from .data import labelled_folder, load_dataset, read_labelled_folder

    name = args.dataset or opened.prep.dataset
    if name not in DATASETS:
        fail(f"{opened.uri} does not say which dataset it was trained on; give --dataset")
    classes = list(opened.prep.classes)
    if (root := labelled_folder(args.data, classes)) is not None:
        return read_labelled_folder(name, root, classes, progress=not args.no_progress)
    return load_dataset(name, args.data, progress=not args.no_progress)


# --------------------------------------------------------------------------- reslab import


def add_import_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="log a published CIFAR ResNet checkpoint as a reslab model",
        description="Map a published CIFAR-10 ResNet checkpoint (the layout of akamaster/pytorch_resnet_cifar10: "
        "conv1, bn1, layer1..3, linear; e.g. ../shared/pretrained/resnet20-12fca82f.th) onto reslab's network and "
        "log it to MLflow with its preprocessing, so evaluate, predict, export, the demo and `mlflow models serve` "
        "can use it. A checkpoint of another depth or layout is refused with what it holds.",
        epilog="example: reslab import ../shared/pretrained/resnet20-12fca82f.th --model resnet20 --register cifar10-resnet20-published")
    p.add_argument("path", metavar="PATH", help="the checkpoint (.th/.pt/.safetensors)")
    p.add_argument("--model", required=True, metavar="NAME", help="reslab architecture it holds: resnet20, resnet32, resnet44, resnet56 or resnet110")
    p.add_argument("--register", metavar="NAME", help="register it as a new version of NAME")
    p.add_argument("--experiment", default="imported", help="MLflow experiment of the import run (default: imported)")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> None:
    from .published import import_published

    out = import_published(args.path, args.model, args.register, args.experiment)
    print(f"imported {args.path} as {args.model}: {out['model_uri']} (run {out['run_id']}, sha256 {out['sha256'][:12]})")
    if args.register:
        print(f"registered {out['registered']}")
    print(f"next: reslab evaluate {out.get('registered', out['model_uri'])}")


# --------------------------------------------------------------------------- reslab evaluate


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy, macro P/R/F1, per-class report and confusion matrix of a logged model",
        description="Evaluate a logged model on a dataset's test split (or a labelled image folder given with --data),\n"
        "with the model's own preprocessing. Several models are evaluated as one ensemble: the mean of their\n"
        "softmax probabilities. --tta averages each model over flipped and shifted views as training's evaluation\n"
        "does, so a run's logged test accuracy can be checked. --log records the metrics in MLflow, linked to the\n"
        "model (model_id) and, for a registry URI, tagged on that version.",
        epilog="example: reslab evaluate models:/cifar10-resnet@champion --log --out report.json\n"
        "ensemble: reslab evaluate runs:/RUN_A/model runs:/RUN_B/model --tta 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="+", help=MODEL_HELP + "; several: their ensemble")
    _data_args(p)
    p.add_argument("--tta", type=int, nargs="?", const=1, default=0, choices=sorted(TTA_VIEWS), metavar="LEVEL",
                   help="test-time augmentation as `reslab train --tta`: 0 the image alone (default, as served), "
                   "1 (--tta alone) with its mirror, 2 also both shifted by a pixel (6 passes per image)")
    p.add_argument("--limit", type=int, metavar="N", help="a stratified subset of N test images")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    p.add_argument("--log", action="store_true", help="log the evaluation to MLflow against the model")
    p.add_argument("--experiment", help="MLflow experiment of the evaluation run (default: the dataset name)")
    p.add_argument("--out", metavar="FILE.json", help="also write the full report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, format_report, log_evaluation

    if args.limit is not None and args.limit < 1:
        fail(f"--limit {args.limit}: give at least 1 image")
    if args.batch_size < 1:
        fail(f"--batch-size {args.batch_size}: give at least 1 image")
    if args.log and len(args.model) > 1:
        fail("--log records an evaluation against one model; evaluate an ensemble without it")
    out = output_path(args.out) if args.out else None
    models = [_open(m) for m in args.model]
    opened = models[0]
    data = _load_data(opened, args)
    report = evaluate(models, data, args.limit, args.batch_size, progress=not args.no_progress, tta=args.tta)
    print(format_report(report))
    if args.log:  # first: a report file that cannot be written must not cost the run
        run_id, linked = log_evaluation(opened, data, report, args.experiment)  # linked: only from the whole test split
        print(f"logged to MLflow run {run_id}" + (f" (metrics linked to model_id {linked})" if linked else ""))
    if out:
        write_text_atomic(out, json.dumps(report, indent=2))
        print(f"report written to {out}")


# --------------------------------------------------------------------------- reslab export


def add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a logged model as ONNX or a torch.export pt2 file, verified on real images",
        description="Export a logged model for runtimes without MLflow, with a dynamic batch dimension. Beside the "
        "file, FILE.json holds its class names and preprocessing. The export is run on real test images and compared "
        "with PyTorch (onnxruntime for ONNX): the largest absolute logit difference and top-1 agreement are printed; "
        "a disagreement is an error.",
        epilog="example: reslab export models:/cifar10-resnet@champion --format onnx --out cifar10-resnet.onnx")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--format", required=True, choices=["onnx", "pt2"], help="onnx (onnxruntime, other languages) or pt2 (torch.export)")
    p.add_argument("--out", metavar="FILE", help="output file (default: <model name>.<format> in the current folder)")
    p.add_argument("--verify", type=int, default=256, metavar="N", help="test images to compare on (default: 256; 0: skip)")
    p.add_argument("--tolerance", type=float, default=1e-3, metavar="T", help="largest acceptable logit difference (default: 1e-3)")
    _data_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading data")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_model, sidecar_path, verify

    if args.verify < 0:
        fail(f"--verify {args.verify}: give 0 (skip) or a number of images")
    if not args.tolerance >= 0:  # NaN too: it turned the check off
        fail(f"--tolerance {args.tolerance}: give the largest acceptable logit difference, 0 or more")
    if args.out:
        output_path(args.out)
    opened = _open(args.model)
    stem = opened.name or opened.config.get("architecture") or "model"
    out = Path(args.out or f"{stem}.{args.format}")
    # written under a temporary name and moved into place once verified: an export that disagrees with PyTorch
    # (or a check stopped half way) leaves no file that looks like a good one
    partial = out.with_name(f".{out.stem}.{os.getpid()}.partial{out.suffix}")  # torch.export wants its .pt2
    try:
        export_model(opened, args.format, partial)
        side = {**json.loads(sidecar_path(partial).read_text()), "file": out.name}
        if args.verify:
            data = _load_data(opened, args)
            from .evaluate import check_compatible, model_inputs

            check_compatible(opened, data)
            keep = spread_sample(len(data.test_y), args.verify)
            check = verify(opened, partial, args.format, model_inputs(opened, data.test_x[keep]))
            side["verification"] = {**check, "dataset": data.name, "runtime": "onnxruntime" if args.format == "onnx" else "torch.export"}
            print(f"verified on {check['images']} {data.name} test images: max abs logit diff {check['max_abs_diff']:.2e}, "
                  f"top-1 identical on {check['top1_agree']}/{check['images']}")
            if check["max_abs_diff"] > args.tolerance or not check["top1_identical"]:
                raise ValueError(f"the {args.format} export disagrees with PyTorch (max abs diff {check['max_abs_diff']:.2e}, "
                                 f"top-1 {check['top1_agree']}/{check['images']}); nothing was written")
        os.replace(partial, out)
        sidecar_path(out).write_text(json.dumps(side, indent=2))
    finally:
        partial.unlink(missing_ok=True)
        sidecar_path(partial).unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {sidecar_path(out)}")
