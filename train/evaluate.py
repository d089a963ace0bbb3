"""``reslab evaluate``: a logged model on a dataset's test split (or any labelled image folder):
accuracy, macro precision/recall/F1, per-class report and confusion matrix, optionally logged to
MLflow against the model itself (``model_id``) and its registry version. Several models are judged as
one ensemble (the mean of their softmax probabilities), and test-time augmentation is the training
engine's own (``--tta``), so a run's logged test accuracy can be checked and ensembles measured with
the same code."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from tqdm import tqdm

from .config import TTA_VIEWS
from .data import ImageData, stratified_sample
from .engine import tta_logits
from .lineage import log_input
from .report import classification_metrics, metrics_by_part, part_metrics, plot_confusion
from .tracking import experiment_id, tagged_accuracy
from .usemodel import OpenedModel


def check_compatible(opened: OpenedModel, data: ImageData) -> None:
    if list(data.classes) != list(opened.prep.classes):
        raise ValueError(f"{opened.uri} knows classes {list(opened.prep.classes)}, the data has {list(data.classes)}; "
                         "evaluate it on the dataset it was trained for")


def model_inputs(opened: OpenedModel, x: np.ndarray) -> np.ndarray:
    """Dataset images at the model's size and channel count (a no-op when they already are)."""
    p = opened.prep
    if x.shape[1:] == (p.image_size, p.image_size, p.channels):
        return x
    rgb = (lambda a: np.repeat(a, 3, 2)) if x.shape[3] == 1 else (lambda a: a)
    return np.stack([p.to_model_input(rgb(a)) for a in x])


@torch.no_grad()
def predict_arrays(opened: OpenedModel, x: np.ndarray, batch_size: int = 500, progress: bool = True,
                   tta: int = 0) -> np.ndarray:
    """Softmax probabilities for uint8 (N, H, W, C) images; ``tta`` is a test-time augmentation level
    (config.TTA_VIEWS), averaged over the views' logits as training's evaluation does."""
    opened.module.eval()
    out = []
    bar = tqdm(total=len(x), unit="img", desc="evaluate", disable=not progress, leave=False)
    for i in range(0, len(x), batch_size):
        batch = opened.prep.tensor(model_inputs(opened, x[i : i + batch_size]))
        out.append(torch.softmax(tta_logits(opened.module, batch, tta), 1).numpy())
        bar.update(len(batch))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, len(opened.prep.classes)), np.float32)


def evaluate(models: OpenedModel | Sequence[OpenedModel], data: ImageData, limit: int | None = None,
             batch_size: int = 500, progress: bool = True, tta: int = 0) -> dict[str, Any]:
    """One model, or several as an ensemble: the mean of their softmax probabilities, each model fed
    through its own preprocessing (they need the same classes, not the same input size)."""
    models = [models] if isinstance(models, OpenedModel) else list(models)
    if not models:
        raise ValueError("no model to evaluate")
    if tta not in TTA_VIEWS:
        raise ValueError(f"test-time augmentation level {tta}: choose one of {sorted(TTA_VIEWS)}")
    for opened in models:
        check_compatible(opened, data)
    x, y, parts = data.test_x, data.test_y, data.test_parts()
    subset = bool(limit and limit < len(y))
    if subset:  # a stratified sample of exactly --limit images (the splits are sorted by class)
        keep = stratified_sample(y, limit)
        x, y = x[keep], y[keep]
        parts = {name: np.flatnonzero(np.isin(keep, idx)) for name, idx in parts.items()}  # positions in the subset
    if not len(x):
        raise ValueError(f"{data.name} ({data.source}) has no test images")
    t0 = time.perf_counter()
    probs = np.mean([predict_arrays(opened, x, batch_size, progress, tta) for opened in models], axis=0)
    seconds = time.perf_counter() - t0
    report = classification_metrics(y, probs.argmax(1), list(models[0].prep.classes))
    report["parts"] = metrics_by_part(y, probs.argmax(1), list(models[0].prep.classes), parts)
    report.update(images=int(len(y)), seconds=seconds, images_per_sec=len(y) / max(seconds, 1e-9),
                  model_uri=" + ".join(m.uri for m in models), models=[m.uri for m in models], tta=tta,
                  dataset=data.name, data_source=data.source, data_fingerprint=data.fingerprint,
                  labelled_folder=bool(data.extra.get("labelled_folder")), subset=subset)
    return report


def format_report(report: dict[str, Any]) -> str:
    classes = list(report["per_class"])
    w = max(len(c) for c in classes + ["class"])
    n, tta = len(report["models"]), report["tta"]
    what = report["model_uri"] if n == 1 else f"ensemble of {n} (mean softmax): {report['model_uri']}"
    views = f", TTA level {tta}: {TTA_VIEWS[tta]} views per image" if tta else ""
    where = f"the labelled images in {report['data_source']}" if report.get("labelled_folder") else f"{report['dataset']} test split"
    lines = [f"{what} on {where} ({report['images']} images{views}, "
             f"{report['images_per_sec']:.0f} img/s)",
             f"accuracy {report['accuracy']:.4f}   macro precision {report['precision_macro']:.4f}   "
             f"macro recall {report['recall_macro']:.4f}   macro F1 {report['f1_macro']:.4f}",
             *(f"  {part} ({m['images']} images): accuracy {m['accuracy']:.4f}   macro F1 {m['f1_macro']:.4f}"
               for part, m in report.get("parts", {}).items()), "",
             f"{'class':<{w}}  precision  recall  f1      support"]
    for c, v in report["per_class"].items():
        lines.append(f"{c:<{w}}  {v['precision']:.4f}     {v['recall']:.4f}  {v['f1-score']:.4f}  {int(v['support'])}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    short = [c[:5] for c in classes]
    lines.append(" " * (w + 2) + " ".join(f"{s:>5}" for s in short))
    for c, row in zip(classes, report["confusion_matrix"]):
        lines.append(f"{c:<{w}}  " + " ".join(f"{n:>5}" for n in row))
    return "\n".join(lines)


def log_dataset(data: ImageData, context: str, x: np.ndarray, y: np.ndarray, model_id: str | None = None) -> None:
    """Record ``data`` as an MLflow input of the active run; the content fingerprint is its digest."""
    from mlflow.entities import LoggedModelInput

    with warnings.catch_warnings():  # a path source "can be interpreted in multiple ways"
        warnings.simplefilter("ignore")
        ds = mlflow.data.from_numpy(x[:1], targets=y[:1], source=data.source or data.name, name=data.name,
                                    digest=(data.fingerprint or "unknown")[:36])
    log_input(ds, context=context, model=LoggedModelInput(model_id) if model_id else None)


def log_evaluation(opened: OpenedModel, data: ImageData, report: dict[str, Any],
                   experiment: str | None = None) -> tuple[str, str | None]:
    """An ``evaluate`` run holding the metrics (linked to the model's ``model_id``), the report and the
    confusion matrix; the registry version gets ``test_acc`` if it had none that is a number (only from the whole test
    split). Returns the run id and the model_id its metrics are linked to (None: not the whole test split)."""
    exp = experiment or data.name
    metrics = {"test_acc": report["accuracy"], "test_precision_macro": report["precision_macro"],
               "test_recall_macro": report["recall_macro"], "test_f1_macro": report["f1_macro"]}
    metrics.update({f"test_f1_{c}": v["f1-score"] for c, v in report["per_class"].items() if v["support"]})
    metrics.update(part_metrics(report.get("parts", {})))
    # the logged model's page shows its test metrics: linked only from the whole test split
    whole = not data.extra.get("labelled_folder") and not report.get("subset")
    model_id = opened.model_id if whole else None
    with mlflow.start_run(experiment_id=experiment_id(exp), run_name=f"evaluate-{opened.name or 'model'}") as run:
        mlflow.set_tags({"evaluated_model": opened.uri, "dataset": data.name, "dataset_hash": data.fingerprint,
                         "tta": str(report["tta"]), **({"model_id": model_id} if model_id else {})})
        log_dataset(data, "test", data.test_x, data.test_y, model_id)
        mlflow.log_metrics(metrics, model_id=model_id)
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            (t / "test_report.json").write_text(json.dumps(report, indent=2))
            mlflow.log_artifact(str(t / "test_report.json"))
            mlflow.log_artifact(str(plot_confusion(report["confusion_matrix"], list(opened.prep.classes),
                                                   t / "confusion_matrix.png")), "plots")
        mlflow.log_params({"images": report["images"], "subset": report.get("subset", False)})
    # the registry version's test accuracy is the whole test split's: not a --limit subset's, nor a user's own images'
    if opened.name and whole:
        client = mlflow.MlflowClient()
        mv = client.get_model_version(opened.name, opened.version)
        client.set_model_version_tag(opened.name, opened.version, "evaluated_test_acc", f"{report['accuracy']:.6f}")
        if not np.isfinite(tagged_accuracy(mv)):  # none yet, or "nan" (a run registered without testing)
            client.set_model_version_tag(opened.name, opened.version, "test_acc", str(report["accuracy"]))
    return run.info.run_id, model_id
