"""Classification metrics (scikit-learn) and the plots people would rather look at than read.

scikit-learn and matplotlib load when a report is made, not with the module: ``train.tracking`` imports
this module, and the processes that only serve or predict (``reslab demo``, ``reslab predict``) would
otherwise pay ~1 s of start-up for libraries they never use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only: no display, also on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def classification_metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class report and the confusion matrix."""
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    idx = list(range(len(classes)))
    # macro averages over the classes the images have or were given (sklearn's own default): a class absent from
    # a --limit subset or a folder of some classes would otherwise count as a zero
    present = sorted(set(np.asarray(labels).tolist()) | set(np.asarray(preds).tolist()))
    p, r, f1, _ = precision_recall_fscore_support(labels, preds, labels=present or idx, average="macro", zero_division=0)
    report = classification_report(labels, preds, labels=idx, target_names=classes, output_dict=True, zero_division=0)
    return {
        "accuracy": float((labels == preds).mean()) if len(labels) else float("nan"),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f1),
        "per_class": {c: {k: float(v) for k, v in report[c].items()} for c in classes},
        "confusion_matrix": confusion_matrix(labels, preds, labels=idx).tolist(),
    }


def metrics_by_part(labels: np.ndarray, preds: np.ndarray, classes: list[str],
                    parts: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Accuracy and macro F1 on each named part of a test split (``ImageData.test_parts()``: FER-2013's
    PrivateTest and PublicTest), the numbers published results quote; empty without parts."""
    out = {}
    for part, idx in parts.items():
        if not len(idx):  # a --limit subset too small to hold any of this part
            continue
        m = classification_metrics(labels[idx], preds[idx], classes)
        out[part] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "images": int(len(idx))}
    return out


def part_metrics(parts: dict[str, dict[str, float]]) -> dict[str, float]:
    """:func:`metrics_by_part`'s numbers as MLflow metrics: ``test_acc_privatetest``, ``test_f1_macro_privatetest``..."""
    out = {}
    for part, m in parts.items():
        out.update({f"test_acc_{part.lower()}": m["accuracy"], f"test_f1_macro_{part.lower()}": m["f1_macro"]})
    return out


def plot_confusion(cm: list[list[int]] | np.ndarray, classes: list[str], path: Path, title: str = "") -> Path:
    """One run's confusion matrix (logged with every evaluated run)."""
    return plot_confusions([(cm, classes, title)], path)


def plot_confusions(panels: list[tuple[Any, list[str], str]], path: Path, per_line: int = 4) -> Path:
    """Confusion matrices ``(matrix, class names, title)`` side by side, at most ``per_line`` a line,
    so that several runs can be read together (``reslab compare``); one panel is drawn larger."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    several = len(panels) > 1
    cols = min(per_line, len(panels))
    lines = -(-len(panels) // cols)
    k = max(len(classes) for _, classes, _ in panels)
    width, height = (1.2 + 0.42 * k, 1.2 + 0.42 * k) if several else (1.0 + 0.7 * k, 0.8 + 0.7 * k)
    fig, axes = plt.subplots(lines, cols, figsize=(width * cols, height * lines + (0.4 if several else 0)), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (cm, classes, title) in zip(axes.flat, panels):
        cm = np.asarray(cm)
        accuracy = f"accuracy {np.trace(cm) / max(cm.sum(), 1):.2%}"
        disp = ConfusionMatrixDisplay(cm, display_labels=classes)
        if not several:
            disp.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
            ax.set_title(title or f"confusion matrix ({accuracy})")
            continue
        disp.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=90, text_kw={"fontsize": 6})
        ax.set_title(f"{title}\n{accuracy}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: list[dict[str, float]], path: Path, title: str = "") -> Path:
    """Loss and accuracy against epoch, train and validation side by side (plus validation accuracy
    against wall-clock minutes, the time-to-accuracy curve, when the history has the times)."""
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    timed = [h for h in history if "val_acc" in h and "wall_seconds" in h]
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(15 if timed else 10, 4))
    a1, a2 = axes[0], axes[1]
    if timed:
        axes[2].plot([h["wall_seconds"] / 60 for h in timed], [h["val_acc"] for h in timed], "s-", color="C1")
        axes[2].set(xlabel="wall-clock minutes (training + evaluation)", ylabel="validation accuracy",
                    title="time to accuracy")
        axes[2].grid(alpha=0.3)
    for ax, key, name in ((a1, "loss", "loss"), (a2, "acc", "accuracy")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
        if any(f"val_{key}" in h for h in history):
            ax.plot(ep, [h.get(f"val_{key}", np.nan) for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
