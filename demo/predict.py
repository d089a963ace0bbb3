"""``reslab predict``: classify image files with a logged model, outside the browser. The same
decoding (train.images), preprocessing (the model's own metadata), face finding (FER-2013) and batched
forward pass (demo.serving.ServedModel.classify) as the demo. Registered through demo's own
entry point, so ``train`` never imports ``demo``."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.data import DATASETS, IMAGE_SUFFIXES
from train.files import output_path

FACE_DATASETS = {"fer2013"}  # as demo.serving: pictures of faces, find them first


@dataclass
class Row:
    path: str
    face: int | None = None  # 1-based face number, None: the whole image
    box: tuple[int, int, int, int] | None = None  # x, y, w, h in the input's pixels
    top: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        if self.face is not None:
            out["face"], out["box"] = self.face, list(self.box) if self.box else None
        if self.error:
            out["error"] = self.error
        else:
            out["top"] = [{"class": c, "probability": round(p, 6)} for c, p in self.top]
        if self.notes:
            out["notes"] = self.notes
        return out


def collect(paths: list[str], tmp: Path) -> Iterator[tuple[str, Path | None, str | None]]:
    """(name shown, file to read or None, error) for every input: files, folders (recursive), globs
    and zips (members extracted to ``tmp`` one by one as they are read)."""
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                yield arg, None, "folder holds no image files"
            yield from ((str(f), f, None) for f in files)
        elif p.is_file() and p.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(p) as z:
                    members = sorted((i for i in z.infolist() if not i.is_dir() and Path(i.filename).suffix.lower() in IMAGE_SUFFIXES),
                                     key=lambda i: i.filename)
                    for k, info in enumerate(members):
                        target = tmp / f"{k}{Path(info.filename).suffix.lower()}"
                        try:
                            target.write_bytes(z.read(info))
                        except (zipfile.BadZipFile, OSError, ValueError) as e:
                            yield f"{arg}!{info.filename}", None, f"unreadable zip member ({e})"
                            continue
                        yield f"{arg}!{info.filename}", target, None
            except (zipfile.BadZipFile, OSError) as e:
                yield arg, None, f"not a readable zip ({str(e).splitlines()[0][:80]})"
        elif p.is_file():
            yield arg, p, None
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                yield arg, None, "no such file, folder or glob match"
            for m in matches:
                yield from collect([m], tmp)


def predict_paths(opened: Any, paths: list[str], top_k: int = 3, batch_size: int = 64, faces: bool = False,
                  progress: bool = True) -> list[Row]:
    """Classify every image in ``paths`` with ``opened`` (train.usemodel.OpenedModel); unreadable files
    become rows with an error, never an exception."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from .faces import FaceFinder, crop
    from train.images import FILE_FORMATS, BadImage, decode_image

    finder = FaceFinder() if faces else None
    classes = list(opened.prep.classes)
    rows: list[Row] = []
    pending: list[tuple[Row, np.ndarray]] = []  # (row to fill, model input)
    k = min(top_k, len(classes))

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():
            probs = torch.softmax(opened.module(opened.prep.tensor([x for _, x in pending])).float(), 1).numpy()
        for (row, _), p in zip(pending, probs):
            row.top = [(classes[j], float(p[j])) for j in p.argsort()[::-1][:k]]
        pending.clear()

    def add(name: str, decoded: Any) -> None:
        boxes = finder.detect(decoded.rgb) if finder else []
        notes = list(decoded.notes) + (["No face found: classified the whole image."] if finder and not boxes else [])
        # large images are shrunk right after decoding (train/images.py): boxes go back to the file's pixels,
        # in the picture as viewers show it (EXIF orientation applied)
        h, w = decoded.rgb.shape[:2]
        sx, sy = (decoded.source_size[0] / w, decoded.source_size[1] / h) if all(decoded.source_size) else (1.0, 1.0)
        for i, b in enumerate(boxes or [None]):
            box = (round(b.x * sx), round(b.y * sy), round(b.w * sx), round(b.h * sy)) if b else None
            row = Row(name, i + 1 if b else None, box, notes=notes)
            rows.append(row)
            pending.append((row, opened.prep.to_model_input(decoded.rgb if b is None else crop(decoded.rgb, b))))

    with tempfile.TemporaryDirectory() as tmp, tqdm(unit="img", desc="predict", disable=not progress, leave=False) as bar:
        for k_, (name, file, error) in enumerate(collect(paths, Path(tmp))):
            bar.update(1)
            if error:
                rows.append(Row(name, error=error))
                continue
            try:
                add(name, decode_image(file, opened.prep.channels, FILE_FORMATS))
            except BadImage as e:
                rows.append(Row(name, error=str(e)))
            if len(pending) >= batch_size:
                flush()
        flush()
    return rows


def format_table(rows: list[Row]) -> str:
    w = min(60, max([len(r.path) for r in rows] + [4]))
    lines = [f"{'path':<{w}}  {'face box':<18}  prediction"]
    for r in rows:
        name = r.path if len(r.path) <= w else "..." + r.path[-(w - 3):]
        box = f"#{r.face} {r.box[0]},{r.box[1]} {r.box[2]}x{r.box[3]}" if r.box else ""
        what = f"ERROR: {r.error}" if r.error else ", ".join(f"{c} {p:.1%}" for c, p in r.top)
        lines.append(f"{name:<{w}}  {box:<18}  {what}")
    return "\n".join(lines)


def write_out(rows: list[Row], out: Path, top_k: int) -> None:
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps([r.record() for r in rows], indent=2))
        return
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "face", "x", "y", "w", "h"]
                   + [f"{s}{i}" for i in range(1, top_k + 1) for s in ("class", "prob")] + ["error"])
        for r in rows:
            tops = [v for c, p in r.top for v in (c, f"{p:.6f}")]
            tops += [""] * (2 * top_k - len(tops))
            w.writerow([r.path, r.face or "", *(r.box or ("", "", "", "")), *tops, r.error or ""])


# --------------------------------------------------------------------------- the command


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify image files, folders, globs or zips with a logged model",
        description="Classify images with a logged model and its own preprocessing (as the demo does), in batches. "
        "Prints a table; --out writes CSV or JSON (path, top-k classes with probabilities, face boxes). "
        "Unreadable files are reported one by one and counted; they never stop the run.",
        epilog="example: reslab predict models:/cifar10-resnet@champion photos/ 'more/*.jpg' set.zip --top-k 3 --out results.csv")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a run id "
                   "(default: the --dataset's champion, models:/cifar10-resnet@champion)")
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files, folders (searched recursively), globs (quote them) or zips")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10", help="whose champion MODEL defaults to (default: cifar10)")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes per row (default: 3)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default: 64)")
    p.add_argument("--faces", action=argparse.BooleanOptionalAction, default=None,
                   help="find faces and classify each (default: on for face models, i.e. FER-2013)")
    p.add_argument("--out", metavar="FILE.csv|FILE.json", help="write the results as CSV or JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> None:
    from train.cli import fail
    from train.tracking import resolve_model_uri, setup_tracking
    from train.usemodel import default_model_uri, open_model

    if args.out:
        if Path(args.out).suffix.lower() not in (".csv", ".json"):
            fail(f"--out {args.out}: give a .csv or .json file")
        output_path(args.out)
    if args.top_k < 1 or args.batch_size < 1:
        fail("--top-k and --batch-size must be at least 1")
    model = args.model
    if model is None and len(args.paths) == 1 and not Path(args.paths[0]).exists() and (
            resolve_model_uri(args.paths[0]) != args.paths[0] or args.paths[0].startswith(("models:/", "runs:/"))):
        fail(f"{args.paths[0]} names a model: give the images to classify after it (reslab predict MODEL PATH ...)")
    if model and not model.startswith(("models:/", "runs:/")) and Path(model).exists() and not Path(model, "MLmodel").exists():
        args.paths.insert(0, model)  # `reslab predict photo.png`: no MODEL given, the first PATH was taken for it
        model = None
    setup_tracking()
    opened = open_model(model or default_model_uri(args.dataset))
    faces = opened.prep.dataset in FACE_DATASETS if args.faces is None else args.faces
    rows = predict_paths(opened, args.paths, args.top_k, args.batch_size, faces, progress=not args.no_progress)
    print(format_table(rows))
    bad = [r for r in rows if r.error]
    images = len({r.path for r in rows if not r.error})
    summary = f"{images} image(s) classified" + (f", {len([r for r in rows if r.face])} face(s)" if faces else "")
    print(summary + f", {len(bad)} bad file(s)")
    if args.out:
        write_out(rows, Path(args.out), min(args.top_k, len(opened.prep.classes)))
        print(f"results written to {args.out}")
    if not images and bad:
        raise SystemExit(1)
