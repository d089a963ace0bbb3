"""``reslab import``: a published CIFAR ResNet checkpoint logged to MLflow as a reslab model (same
artifacts as a trained one: pt2 graph, safetensors weights, preprocessing metadata), so ``reslab
evaluate``/``predict``/``export``, the demo and ``mlflow models serve`` use it like any other."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from .config import TrainConfig
from .data import DATASETS, ImageData
from .models import create_model
from .pretrained import PUBLISHED_MEAN, PUBLISHED_STD, load_published
from .tracking import experiment_id, log_model, register_model, setup_tracking


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def published_metadata() -> ImageData:
    """CIFAR-10 as the publisher trained on it: RGB 32x32, ImageNet mean/std, the sorted class names.
    An ImageData without images: only its metadata is logged."""
    info = DATASETS["cifar10"]
    empty = np.zeros((0, info.image_size, info.image_size, info.channels), np.uint8)
    return ImageData("cifar10", list(info.classes), empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64),
                     list(PUBLISHED_MEAN), list(PUBLISHED_STD), source="published", fingerprint="")


def import_published(path: str | Path, model_name: str, register: str | None = None,
                     experiment: str = "imported") -> dict[str, Any]:
    path = Path(path)
    if not model_name.startswith("resnet") or model_name.endswith("v2") or not model_name[6:].isdigit() \
            or int(model_name[6:]) in (18, 34, 50, 101, 152) or model_name == "resnet9":
        raise ValueError(f"--model {model_name}: published checkpoints are the paper's CIFAR ResNets (resnet20, resnet32, resnet44, resnet56, resnet110)")
    model = load_published(create_model(model_name, 10, 3, shortcut="A"), path, model_name)
    digest = sha256(path)
    setup_tracking()
    cfg = TrainConfig(model=model_name, dataset="cifar10", epochs=0)
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"import-{path.stem}") as run:
        mlflow.set_tags({"source_checkpoint": str(path.resolve()), "source_sha256": digest, "model": model_name,
                         "dataset": "cifar10", "imported": "published CIFAR ResNet checkpoint"})
        mlflow.log_params({"model": model_name, "pretrained": path.name})
        info = log_model(model, cfg, published_metadata())
        out: dict[str, Any] = {"run_id": run.info.run_id, "model_uri": info.model_uri, "model_id": info.model_id,
                               "sha256": digest}
        if register:
            mv = register_model(info.model_uri, register, tags={"run_id": run.info.run_id, "model": model_name,
                                                                "dataset": "cifar10", "source_sha256": digest})
            out.update(version=str(mv.version), registered=f"models:/{register}/{mv.version}")
    return out
