"""Face finding with OpenCV's bundled Haar cascade (no downloaded weights), largest face first.

FER-2013 images are tight 48x48 face crops with a little margin, so each detected box is widened
by the same kind of margin before it is handed to the emotion model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

CASCADE = "haarcascade_frontalface_default.xml"
DETECT_MAX_SIDE = 1024  # detect on a copy no larger than this (Haar cost grows with the pixel count)
# Small inputs (a 48x48 FER crop) are upscaled so a face fits the detector's 24-pixel window with room
# around it. 96 finds as many faces as 256 did at a seventh of the cost: on 400 FER-2013 test images
# 75.8% vs 77.0% found, 8 vs 63 ms each; served accuracy of the fast-cpu champion on 1,000 test images
# 70.3% vs 69.3% (docs/demo.md). 64 found 73.0%, 48 66.5%.
DETECT_MIN_SIDE = 96
# A face narrower than this many of the picture's own pixels holds too little to read an emotion from (a
# FER-2013 face is 48); not searching for smaller ones skips the cascade's densest scales where a small
# picture was upscaled: a 48x48 face in 3.8 instead of 7.0 ms, as many found (docs/demo.md).
MIN_FACE_PIXELS = 24
MIN_BOX_SIDE = 4  # a box thinner than this (clipped at the image's edge) is no face: dropped, never cropped


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h


class FaceFinder:
    """Thread-safe wrapper around one cascade (OpenCV classifiers are not re-entrant)."""

    def __init__(self, margin: float = 0.15, min_face_fraction: float = 0.04) -> None:
        if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved the cascades out of the main package
            raise RuntimeError(f"OpenCV {cv2.__version__} has no Haar cascades; install opencv-python-headless<5")
        path = cv2.data.haarcascades + CASCADE
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV's Haar cascade {path} could not be loaded")
        self.margin = margin
        self.min_face_fraction = min_face_fraction
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Face boxes in ``rgb``'s pixel coordinates, widened by the margin, largest first."""
        h, w = rgb.shape[:2]
        scale = min(DETECT_MAX_SIDE / max(h, w), max(1.0, DETECT_MIN_SIDE / min(h, w)))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale != 1.0:
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                              interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        gray = cv2.equalizeHist(gray)
        side = max(24, int(min(gray.shape) * self.min_face_fraction), round(MIN_FACE_PIXELS * scale))
        # A face that fills the frame (every FER-2013 image) has no context around it for the cascade's
        # windows; a replicated border gives it some.
        pad = max(gray.shape) // 6
        gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        with self._lock:
            found = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        boxes = []
        for fx, fy, fw, fh in (found if len(found) else []):
            fx, fy, m = fx - pad, fy - pad, self.margin
            x0, y0 = (fx - m * fw) / scale, (fy - m * fh) / scale
            x1, y1 = (fx + fw * (1 + m)) / scale, (fy + fh * (1 + m)) / scale
            x0, y0, x1, y1 = max(0, int(x0)), max(0, int(y0)), min(w, int(round(x1))), min(h, int(round(y1)))
            if min(x1 - x0, y1 - y0) >= MIN_BOX_SIDE:
                boxes.append(Box(x0, y0, x1 - x0, y1 - y0))
        kept: list[Box] = []
        for b in sorted(boxes, key=lambda b: b.area, reverse=True):
            if all(_inside(b, k) < 0.5 for k in kept):  # a face within a face is a false detection
                kept.append(b)
        return kept


def _inside(small: Box, big: Box) -> float:
    """Share of ``small``'s area that lies within ``big``."""
    w = min(small.x + small.w, big.x + big.w) - max(small.x, big.x)
    h = min(small.y + small.h, big.y + big.h) - max(small.y, big.y)
    return max(0, w) * max(0, h) / max(1, small.area)


def crop(rgb: np.ndarray, box: Box) -> np.ndarray:
    return rgb[box.y : box.y + box.h, box.x : box.x + box.w]


def draw_boxes(rgb: np.ndarray, boxes: list[Box], labels: list[str]) -> np.ndarray:
    """The input with numbered boxes, so the per-face answers can be matched to faces."""
    out = rgb.copy()
    thick = max(2, round(max(rgb.shape[:2]) / 300))
    for i, (b, text) in enumerate(zip(boxes, labels), 1):
        cv2.rectangle(out, (b.x, b.y), (b.x + b.w, b.y + b.h), (255, 200, 0), thick)
        scale = max(0.5, b.w / 180)
        cv2.putText(out, f"{i}: {text}", (b.x, max(15, b.y - 6)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 200, 0),
                    max(1, thick - 1), cv2.LINE_AA)
    return out
