"""Clickable example images taken from each dataset's test split (never from its train split)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from train.data import DataError, load_dataset


EXAMPLES_VERSION = 2  # bump when the way examples are drawn or written changes: old files are not reused


def example_dir(dataset: str, fingerprint: str) -> Path:
    """Under the system temp folder (which Gradio serves without extra allowed paths), in a folder of this
    user's only (0700; another user's folder of that name is not trusted), keyed by the data's fingerprint
    and this code's version, so a changed dataset or a new release never shows stale images."""
    uid = getattr(os, "getuid", lambda: 0)()
    root = Path(tempfile.gettempdir()) / f"reslab-demo-examples-{uid}"
    root.mkdir(mode=0o700, exist_ok=True)
    if root.is_symlink() or root.stat().st_uid != uid:
        root = Path(tempfile.mkdtemp(prefix="reslab-demo-examples-"))
    d = root / f"{dataset}-{fingerprint}-v{EXAMPLES_VERSION}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def dataset_examples(dataset: str, per_class: int = 1, enlarge: int = 4) -> list[str]:
    """One test image per class (the first of each, so the set is stable), saved enlarged as PNG.
    For face datasets a collage of three test faces is added, to show one label per face."""
    try:
        data = load_dataset(dataset, progress=False)
    except (DataError, FileNotFoundError, OSError):
        return []
    out_dir = example_dir(dataset, data.fingerprint)
    paths = []
    for c, name in enumerate(data.classes):
        for j in np.flatnonzero(data.test_y == c)[:per_class]:
            paths.append(_save(data.test_x[j], out_dir / f"{name}-{j}.png", enlarge))
    if dataset == "fer2013":
        wanted = [data.classes.index(c) for c in ("happy", "angry", "neutral") if c in data.classes]
        picks = [int(np.flatnonzero(data.test_y == c)[0]) for c in wanted]
        framed = [np.pad(data.test_x[j], ((24, 24), (24, 24), (0, 0)), constant_values=128) for j in picks]
        row = np.concatenate(framed, axis=1)
        paths.append(_save(row, out_dir / "three-faces.png", enlarge))
    return paths


def _save(img: np.ndarray, path: Path, enlarge: int) -> str:
    if not path.exists():  # written under a temporary name, so a second server never reads half a file
        pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
        pil.resize((pil.width * enlarge, pil.height * enlarge), Image.Resampling.LANCZOS).save(tmp)
        os.replace(tmp, path)
    return str(path)
