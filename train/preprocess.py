"""The preprocessing a logged model expects, read from its own metadata (``model_config.json`` /
MLmodel metadata): class names, input size, channels, mean/std. One implementation for the demo,
``reslab predict``/``evaluate``/``export`` and the REST model, so they all see what training saw
(and one decoder before it: train/images.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from .augment import normalize

REQUIRED = ("classes", "image_size", "channels", "mean", "std")


def to_model_input(rgb: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Centre square, resized to the model's size, in its channel count: uint8 (S, S, C)."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    sq = rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    out = cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_LINEAR)
    if channels == 1:
        return cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None]
    return out


@dataclass(frozen=True)
class Preprocessing:
    classes: tuple[str, ...]
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str = ""

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], what: str = "the model") -> Preprocessing:
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise ValueError(f"{what} has no preprocessing metadata ({', '.join(missing)}); re-log it with `reslab train`")
        return cls(tuple(meta["classes"]), int(meta["image_size"]), int(meta["channels"]),
                   tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"]), str(meta.get("dataset", "")))

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "classes": list(self.classes), "image_size": self.image_size,
                "channels": self.channels, "mean": list(self.mean), "std": list(self.std),
                "input_layout": "NCHW float32: uint8 RGB (or gray) centre square resized to image_size, /255, "
                                "minus mean, divided by std"}

    def to_model_input(self, rgb: np.ndarray) -> np.ndarray:
        return to_model_input(rgb, self.image_size, self.channels)

    def tensor(self, seen: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S, C) model inputs -> the normalised float NCHW batch."""
        x = torch.from_numpy(np.ascontiguousarray(np.stack(seen) if not isinstance(seen, np.ndarray) else seen))
        return normalize(x, torch.tensor(self.mean), torch.tensor(self.std), channels_last=False)
