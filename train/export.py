"""``reslab export``: a logged model as a standalone file for runtimes without MLflow: ONNX (verified
against PyTorch with onnxruntime on real test images) or a ``torch.export`` pt2 program. Beside it,
``<file>.json`` holds the class names and the preprocessing (size, channels, mean/std, layout)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .usemodel import OpenedModel

FORMATS = ("onnx", "pt2")


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def export_model(opened: OpenedModel, fmt: str, out: Path) -> Path:
    """Write ``opened`` to ``out`` in ``fmt`` with a dynamic batch dimension, plus its JSON sidecar."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    module = opened.module.eval().float()
    p = opened.prep
    example = (torch.randn(2, p.channels, p.image_size, p.image_size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            program = torch.onnx.export(module, example, dynamo=True, input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), external_data=False, verbose=False)
            program.save(str(out), external_data=False)
        else:
            ep = torch.export.export(module, example, dynamic_shapes=({0: batch},))
            torch.export.save(ep, str(out))
    sidecar = {"format": fmt, "file": out.name, "source_model": opened.uri, "model_id": opened.model_id,
               "architecture": opened.config.get("architecture"), "input_name": "input", "output": "logits (softmax for probabilities)",
               **p.as_dict()}
    sidecar_path(out).write_text(json.dumps(sidecar, indent=2))
    return out


def run_exported(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """Logits of the exported file on a normalised float32 NCHW batch."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        return program(torch.from_numpy(x)).numpy()


def verify(opened: OpenedModel, path: Path, fmt: str, images: np.ndarray) -> dict[str, Any]:
    """Run real images (uint8 NHWC at the model's size) through PyTorch and the exported file:
    the largest absolute logit difference and whether every top-1 class agrees."""
    x = opened.prep.tensor(images)
    with torch.no_grad():
        ref = opened.module.eval()(x).numpy()
    got = run_exported(path, fmt, x.numpy())
    diff = float(np.abs(ref - got).max())
    same = int((ref.argmax(1) == got.argmax(1)).sum())
    return {"images": int(len(images)), "max_abs_diff": diff, "top1_agree": same, "top1_identical": same == len(images)}
