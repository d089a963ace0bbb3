"""What MLflow 3 shows about a trained model besides its files: the data it saw (``mlflow.log_input``,
one input per split with the dataset fingerprint as digest) and the registry description, a short
model card written from the run (data, parameters, accuracy)."""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
import numpy as np

from .config import TrainConfig
from .data import ImageData, split_indices

CONTEXTS = ("train", "validation", "test")
DUPLICATE_KEY = ("duplicate key", "UNIQUE constraint failed", "Duplicate entry")  # PostgreSQL, SQLite, MySQL
CARD_PARAMS = ("model", "model_args.width", "epochs", "time_budget", "batch_size", "optimizer", "lr", "weight_decay", "schedule",
               "augment", "label_smoothing", "ema", "subset", "val_fraction", "pretrained", "seed")


def trained_params(params: dict[str, str], metrics: dict[str, float]) -> dict[str, str]:
    """A run's params as it trained: ``epochs`` the epochs it ran (a time budget or early stopping chose them; the
    param is the configured length, e.g. a tuning trial's 3 for a budgeted refit that ran 11) and ``time_budget``
    in seconds where it had one. For model cards (the registry's and the demo's)."""
    out = dict(params)
    if "epochs_run" in metrics:
        out["epochs"] = f"{metrics['epochs_run']:.0f}"
    if out.get("time_budget") not in (None, "", "None"):
        out["time_budget"] = f"{float(out['time_budget']):.0f}s"
    return out


def split_labels(cfg: TrainConfig, data: ImageData) -> dict[str, np.ndarray]:
    """Indices of the train/validation/test images ``fit`` used (the same seeded subset and split)."""
    train_idx, val_idx = split_indices(data.train_y, cfg.subset, cfg.val_fraction, cfg.seed)
    return {"train": data.train_y[train_idx], "validation": data.train_y[val_idx], "test": data.test_y}


def dataset(data: ImageData, split: str, labels: np.ndarray) -> Any:
    """An MLflow dataset for one split: name ``<dataset>-<split>``, digest the content fingerprint,
    profile the split's real shape (a zero-copy view stands in for the pixels: nothing is hashed)."""
    x = data.train_x if split != "test" else data.test_x
    features = np.broadcast_to(x[:1], (len(labels), *x.shape[1:]))
    with warnings.catch_warnings():  # a path source "can be interpreted in multiple ways"
        warnings.simplefilter("ignore")
        return mlflow.data.from_numpy(features, targets=np.asarray(labels), source=data.source or data.name,
                                      name=f"{data.name}-{split}", digest=(data.fingerprint or "unknown")[:36])


def log_datasets(cfg: TrainConfig, data: ImageData, evaluated_test: bool = True) -> dict[str, Any]:
    """``mlflow.log_input`` for each split the run used, with its context; returns them by context."""
    out = {}
    for split, labels in split_labels(cfg, data).items():
        if not len(labels) or (split == "test" and not evaluated_test):
            continue
        out[split] = dataset(data, split, labels)
        log_input(out[split], context=split, tags={"images": str(len(labels))})
    return out


def log_input(ds: Any, **kwargs: Any) -> None:
    """``mlflow.log_input`` that survives a race MLflow's SQL store loses: it looks the dataset up, then inserts
    it, so workers of one study logging a new dataset at the same moment can both insert it and all but one
    fail on the ``datasets`` primary key. That transaction was rolled back; a second try finds the row."""
    for attempt in range(3):
        try:
            mlflow.log_input(ds, **kwargs)
            return
        except mlflow.exceptions.MlflowException as e:
            if attempt == 2 or not any(s in str(e) for s in DUPLICATE_KEY):
                raise


def model_card(client: Any, name: str, version: str | int) -> str:
    """A short markdown model card for a registry version, from its run: data, parameters, accuracy."""
    mv = client.get_model_version(name, str(version))
    lines = [f"**{name}** version {mv.version}"]
    run = client.get_run(mv.run_id) if mv.run_id else None
    if run is None:
        return lines[0]
    m, tags = run.data.metrics, run.data.tags
    p = trained_params(run.data.params, m)
    arch = p.get("model") or tags.get("model", "?")
    how = "imported for" if "imported" in tags else "trained on"
    lines[0] += f": {arch}" + (f" {how} {tags['dataset']}" if "dataset" in tags else "")
    inputs = [(next((t.value for t in d.tags if t.key == "mlflow.data.context"), "?"), d) for d in run.inputs.dataset_inputs]
    if inputs:
        parts = [f"{ctx} {next((t.value for t in d.tags if t.key == 'images'), '?')} images" for ctx, d in inputs]
        lines.append(f"- data: {', '.join(parts)} (fingerprint `{inputs[0][1].dataset.digest}`, source {inputs[0][1].dataset.source})")
    elif "dataset_hash" in tags:
        lines.append(f"- data: {tags['dataset']} (fingerprint `{tags.get('dataset_hash', '?')[:36]}`)")
    params = [f"{k}={p[k]}" for k in CARD_PARAMS if p.get(k) not in (None, "", "None")]
    if params:
        lines.append("- params: " + ", ".join(params))
    acc = [f"{label} {m[k]:.4f}" for k, label in (("test_acc", "test accuracy"), ("test_f1_macro", "test macro F1"),
                                                    ("final_val_acc", "validation accuracy")) if k in m]
    if acc:
        lines.append("- " + ", ".join(acc))
    if "train_seconds" in m:
        lines.append(f"- trained {m['train_seconds']:.0f} s on {tags.get('device', '?')} ({tags.get('precision', '?')}), "
                     f"run `{run.info.run_id}`")
    return "\n".join(lines)
