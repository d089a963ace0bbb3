"""Registered models in, probabilities out: loading through MLflow, preprocessing from the model's
own logged metadata, batched inference, faces and Grad-CAM.

Nothing about a dataset's input format lives here: image size, channels, mean/std and class names
are read from the ``model_config.json`` logged beside each model.

Nothing is unpickled: the network is rebuilt from ``train``'s model registry and the logged
safetensors weights (``extra_files/weights.safetensors``), never through ``mlflow.pytorch.load_model``
(which unpickles non-pt2 models and may fall back to ``torch.load(weights_only=False)``), so whoever
can move ``@champion`` on a shared tracking server cannot run code in the demo. A model without
those files is refused.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from train.augment import normalize
from train.config import CHAMPION, TTA_VIEWS, registered_name
from train.data import DATASETS
from train.images import Decoded
from train.lineage import trained_params
from train.preprocess import to_model_input

from .faces import MIN_BOX_SIDE, Box, FaceFinder, crop, draw_boxes
from .gradcam import forward_with_cam, overlay

# The registry names `reslab tune` / `reslab train --register` use, one per dataset.
REGISTERED_NAMES = {d: registered_name(d) for d in DATASETS}
DEFAULT_ALIAS = CHAMPION
FACE_DATASETS = {"fer2013"}  # datasets whose pictures are faces: find them before classifying
HYPERPARAMS = ("model", "epochs", "time_budget", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "augment",
               "label_smoothing", "ema", "subset")


MAX_FACES = 8  # faces classified per image; the largest are kept


class NoModel(LookupError):
    """No registered model behind a URI; the message says which command makes one."""


class UnsafeModel(NoModel):
    """A registered model the demo will not load: no safetensors weights and config beside it."""


def safe_module(local: Path, uri: str) -> tuple[nn.Module, dict[str, Any]]:
    """The logged network rebuilt from ``train``'s registry and its safetensors weights, with its
    config; reads only ``extra_files/model_config.json`` (JSON) and ``weights.safetensors``."""
    from safetensors.torch import load_file

    from train.models import create_model

    extra = local / "extra_files"
    config_path, weights = extra / "model_config.json", extra / "weights.safetensors"
    if not (config_path.is_file() and weights.is_file()):
        raise UnsafeModel(f"{uri} has no safetensors weights and model_config.json beside it; the demo loads no "
                          "pickled models. Log it again with `reslab train` (which writes both).")
    try:
        config = json.loads(config_path.read_text())
        module = create_model(str(config["architecture"]), len(config["classes"]), int(config["channels"]),
                              **dict(config.get("model_args") or {}))
        module.load_state_dict(load_file(str(weights)))
    except Exception as e:  # noqa: BLE001  (bad JSON, unknown architecture, wrong shapes, a torn file)
        raise UnsafeModel(f"{uri}: its weights and model_config.json do not make a reslab network "
                          f"({type(e).__name__}); log it again with `reslab train`.") from e
    return module.eval(), config


def default_uri(dataset: str) -> str:
    return f"models:/{REGISTERED_NAMES[dataset]}@{DEFAULT_ALIAS}"


def train_command(dataset: str) -> str:
    return f"reslab train --dataset {dataset} --register {REGISTERED_NAMES.get(dataset, dataset + '-resnet')}"


def missing_message(uri: str, dataset: str | None) -> str:
    how = f"`{train_command(dataset)}`" if dataset else "`reslab train --dataset cifar10 --register cifar10-resnet`"
    return (f"No model at `{uri}` yet. Run `make run` (tunes and registers both datasets' champions) or {how}, "
            "then start `reslab demo` again.")


def gradcam_problem(module: torch.nn.Module) -> str | None:
    """Why Grad-CAM cannot run on a served model, or None (it needs the ``features`` method every
    reslab network has)."""
    if not callable(getattr(module, "features", None)):
        return "the network has no features() stage"
    return None


# --------------------------------------------------------------------------- the model card


@dataclass
class ModelCard:
    uri: str
    name: str = ""
    version: str = ""
    aliases: list[str] = field(default_factory=list)
    val_acc: float | None = None
    test_acc: float | None = None
    run_id: str = ""
    experiment_id: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def tta_note(self) -> str:
        """What the test accuracy was measured with, where that is not what the demo does: a run's
        test-time augmentation averages several views of each image, the demo answers from one."""
        try:
            views = TTA_VIEWS.get(int(self.params.get("tta", 0)), 1)
        except ValueError:
            return ""
        return f" (measured averaging {views} views of each image, test-time augmentation; the demo answers from one)" \
            if views > 1 and self.test_acc is not None else ""

    def markdown(self, config: dict[str, Any], mlflow_ui: str | None) -> str:
        def pct(v: float | None) -> str:
            return "n/a" if v is None or not np.isfinite(v) else f"{v:.2%}"

        title = f"{self.name} v{self.version}" if self.name else self.uri
        lines = [f"### {title}", "",
                 "| field | value |", "|---|---|",
                 f"| registered name | `{self.name or '-'}` |",
                 f"| version | {self.version or '-'} |",
                 f"| alias | {', '.join(f'`{a}`' for a in self.aliases) or '-'} |",
                 f"| validation accuracy | {pct(self.val_acc)} |",
                 f"| test accuracy | {pct(self.test_acc)}{self.tta_note()} |",
                 f"| architecture | `{config.get('architecture', '?')}` {json.dumps(config.get('model_args') or {})} |",
                 f"| input | {config['image_size']}x{config['image_size']} px, {config['channels']} channel(s), "
                 f"{len(config['classes'])} classes |"]
        hp = [f"{k}={self.params[k]}" for k in HYPERPARAMS if self.params.get(k) not in (None, "", "None")]
        if hp:
            lines.append(f"| hyperparameters | {', '.join(hp)} |")
        run = f"`{self.run_id}`" if self.run_id else "-"
        if mlflow_ui and self.run_id:
            run += f" ([open run in MLflow]({mlflow_ui}/#/experiments/{self.experiment_id}/runs/{self.run_id}))"
        lines.append(f"| training run | {run} |")
        if mlflow_ui and self.name:
            lines.append(f"| registry | [{self.name} v{self.version} in MLflow]({mlflow_ui}/#/models/{self.name}/versions/{self.version}) |")
        lines.append(f"| model URI | `{self.uri}` |")
        return "\n".join(lines)


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_card(uri: str) -> ModelCard:
    """Registry facts about ``uri`` (models:/name@alias or models:/name/version), plus its run."""
    client = MlflowClient()
    card = ModelCard(uri)
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if m:
        name, alias, version = m.groups()
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        card.name, card.version, card.run_id = mv.name, str(mv.version), mv.run_id or ""
        card.aliases = list(getattr(mv, "aliases", []) or ([alias] if alias else []))
        card.val_acc, card.test_acc = _float(mv.tags.get("val_acc")), _float(mv.tags.get("test_acc"))
    elif uri.startswith("runs:/"):
        card.run_id = uri.split("/")[1]
    if card.run_id:
        try:
            run = client.get_run(card.run_id)
            card.experiment_id = run.info.experiment_id
            metrics = run.data.metrics
            card.params = trained_params(run.data.params, metrics)
            card.val_acc = card.val_acc if card.val_acc is not None else metrics.get("final_val_acc")
            card.test_acc = card.test_acc if card.test_acc is not None else metrics.get("test_acc")
        except MlflowException:
            pass
    return card


def find_mlflow_ui(url: str | None = None, timeout: float = 0.5) -> str | None:
    """The MLflow UI to link to: the one given, else one answering on 127.0.0.1:5000 (``reslab ui``)."""
    if url:
        return url.rstrip("/")
    probe = "http://127.0.0.1:5000"
    try:
        with urllib.request.urlopen(probe + "/health", timeout=timeout) as r:
            return probe if r.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the served model


@dataclass
class Subject:
    """One thing the model classified: a face, or the whole image."""

    seen: np.ndarray  # the model's input as uint8 (S, S, C): exactly what it saw
    box: Box | None
    probs: np.ndarray
    cam: np.ndarray | None = None  # Grad-CAM heatmap (S, S) in [0, 1]


@dataclass
class Result:
    subjects: list[Subject]
    notes: list[str]
    model_ms: float  # forward pass of the whole batch this image was part of (with Grad-CAM's head gradients)
    batch: int  # images (crops) in that forward pass
    annotated: np.ndarray | None = None  # the input with numbered face boxes


class ServedModel:
    """A registered model ready to serve: the pt2 graph for predictions, the rebuilt module for Grad-CAM."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        try:
            local = Path(mlflow.artifacts.download_artifacts(uri))  # files only: nothing is loaded here
        except MlflowException as e:
            raise NoModel(missing_message(uri, _dataset_of(uri))) from e
        self.module, self.config = safe_module(local, uri)
        # channels_last, as the network trained: one FER-2013 face's forward pass and Grad-CAM took 4.4-4.6 ms
        # instead of 4.9-6.4 in NCHW on an AVX2-only CPU (docs/demo.md)
        self.module = self.module.to(memory_format=torch.channels_last)
        self.net = self.module  # predictions and Grad-CAM from the same rebuilt network
        missing = [k for k in ("classes", "image_size", "channels", "mean", "std") if k not in self.config]
        if missing:
            raise UnsafeModel(f"{uri} has no preprocessing metadata ({', '.join(missing)}); re-log it with `reslab train`")
        self.classes: list[str] = list(self.config["classes"])
        self.image_size = int(self.config["image_size"])
        self.channels = int(self.config["channels"])
        self.mean = torch.tensor(self.config["mean"], dtype=torch.float32)
        self.std = torch.tensor(self.config["std"], dtype=torch.float32)
        self.dataset: str = self.config.get("dataset", "")
        self.card = read_card(uri)
        self.gradcam_off = gradcam_problem(self.module)
        if self.gradcam_off:
            print(f"reslab demo: Grad-CAM off for {uri}: {self.gradcam_off}", flush=True)

    @property
    def gradcam_ok(self) -> bool:
        return self.gradcam_off is None

    @property
    def faces(self) -> bool:
        return self.dataset in FACE_DATASETS

    def to_model_input(self, rgb: np.ndarray) -> np.ndarray:
        """Centre square, resized to the model's size, in its channel count: uint8 (S, S, C)."""
        return to_model_input(rgb, self.image_size, self.channels)  # shared with reslab predict and the REST model

    def tensor(self, seen: list[np.ndarray]) -> torch.Tensor:
        return normalize(torch.from_numpy(np.stack(seen)), self.mean, self.std, channels_last=True)

    @torch.no_grad()
    def probabilities(self, seen: list[np.ndarray]) -> np.ndarray:
        """Softmax over classes for model-input crops, in one forward pass of the pt2 graph."""
        return torch.softmax(self.net(self.tensor(seen)).float(), 1).numpy()

    def prepare(self, img: Decoded, finder: FaceFinder | None) -> tuple[list[Box | None], list[np.ndarray], list[str]]:
        """One upload's faces (or the whole image) as model inputs, with its notes."""
        notes = list(img.notes)
        boxes: list[Box | None] = []
        if self.faces and finder is None:
            notes.append("Face detection is unavailable on this server: classified the whole image.")
        elif self.faces:
            boxes = [b for b in finder.detect(img.rgb) if min(b.w, b.h) >= MIN_BOX_SIDE]  # never crop nothing
            if len(boxes) > MAX_FACES:
                notes.append(f"{len(boxes)} faces found: classified the {MAX_FACES} largest.")
                boxes = boxes[:MAX_FACES]
            if not boxes:
                notes.append("No face found: classified the whole image.")
        if not boxes:
            boxes = [None]
        seen = [self.to_model_input(img.rgb if b is None else crop(img.rgb, b)) for b in boxes]
        return boxes, seen, notes

    def classify(self, images: list[Decoded], cams: list[bool], finder: FaceFinder | None = None) -> list[Result]:
        """Classify a batch of decoded uploads: every face (or whole image) of every upload goes
        through the network in one forward pass; Grad-CAM runs on those that asked for it.
        Raises the first upload's exception if any upload fails (see :meth:`classify_each`)."""
        results = self.classify_each(images, cams, finder)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results  # type: ignore[return-value]

    def classify_each(self, images: list[Decoded], cams: list[bool], finder: FaceFinder | None = None) -> list[Result | Exception]:
        """:meth:`classify`, with each upload isolated: one that cannot be prepared (any exception)
        gets that exception in its place, and the others are classified without it."""
        out: list[Result | Exception | None] = [None] * len(images)
        per_image: list[tuple[int, list[Box | None], list[np.ndarray], list[str]]] = []
        for i, img in enumerate(images):
            try:
                per_image.append((i, *self.prepare(img, finder)))
            except Exception as e:  # noqa: BLE001  (isolated: that upload's answer is an error)
                out[i] = e
        if not per_image:
            return out  # type: ignore[return-value]
        flat = [s for _, _, seen, _ in per_image for s in seen]
        owners = [i for i, _, seen, _ in per_image for _ in seen]
        idx = [k for k, owner in enumerate(owners) if cams[owner]] if self.gradcam_ok else []
        heat: dict[int, np.ndarray] = {}
        t0 = time.perf_counter()
        if idx:  # the predictions and the heatmaps from one pass (Grad-CAM differentiates only the head)
            logits, maps = forward_with_cam(self.module, self.tensor(flat), idx)
            probs = torch.softmax(logits.float(), 1).numpy()
            heat = dict(zip(idx, maps))
        else:
            probs = self.probabilities(flat)
        model_ms = (time.perf_counter() - t0) * 1000
        k = 0
        for i, boxes, seen, notes in per_image:
            subjects = []
            for b, s in zip(boxes, seen):
                subjects.append(Subject(s, b, probs[k], heat.get(k)))
                k += 1
            try:
                if cams[i] and not self.gradcam_ok:
                    notes.append(f"Grad-CAM is unavailable for this model ({self.gradcam_off}).")
                annotated = None
                if subjects[0].box is not None:
                    annotated = draw_boxes(images[i].rgb, [s.box for s in subjects],
                                           [self.classes[int(s.probs.argmax())] for s in subjects])
                out[i] = Result(subjects, notes, model_ms, len(flat), annotated)
            except Exception as e:  # noqa: BLE001
                out[i] = e
        return out  # type: ignore[return-value]

    def top(self, probs: np.ndarray) -> dict[str, float]:
        return {c: float(p) for c, p in zip(self.classes, probs)}


def _dataset_of(uri: str) -> str | None:
    return next((d for d, n in REGISTERED_NAMES.items() if f"models:/{n}@" in uri or f"models:/{n}/" in uri), None)


def seen_for_display(seen: np.ndarray, heat: np.ndarray | None = None, size: int = 192) -> np.ndarray:
    """The model's input enlarged (nearest neighbour keeps its real pixels visible), optionally with Grad-CAM."""
    rgb = np.repeat(seen, 3, axis=2) if seen.shape[2] == 1 else seen
    big = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_NEAREST)
    return overlay(big, heat) if heat is not None else big
