"""Turn whatever a user gives a served model into an 8-bit RGB array, or a one-line reason why not.

One decoder for every way in: the demo's uploads, `reslab predict`'s files and the REST model's image
bytes (train/pyfunc.py), so all three see the same pixels, limits and formats. Inputs are untrusted: empty, truncated, not images at all, enormous, tiny, 16-bit, palette,
transparent or animated. Each case gets a message the UI can show instead of a traceback, and the
conversions that change the picture (first frame of a GIF, transparency flattened, 16-bit scaled, palette
or grayscale made RGB for a colour model, colour made grayscale for a grayscale model) are named.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse to decode more than this: 16 MP takes a 12 MP phone photo (4032x3024) with room to spare, and
# decodes to at most 48 MB of RGB; a tiny file of one colour can claim any size (a 126 KB PNG of
# 40 MP would decode to 120 MB), so the limit is on pixels, not bytes. A JPEG counts at the scale it is
# decoded at (1/2, 1/4 or 1/8 when that still gives MAX_SIDE): a 24 MP camera photo decodes as 1.5 MP.
MAX_PIXELS = 16_000_000
# Decoded images are shrunk to this longest side at once: the models see 32-48 pixels and faces are
# looked for at 1024 px, so nothing is lost, and a batch of 16 holds 16 small images, not 16 photos.
MAX_SIDE = 1024
# Only the formats a browser upload, paste or webcam photo can be. Pillow knows many more (EPS is
# handed to Ghostscript, others have had decoder bugs): none of them is opened.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# `reslab predict` reads what training reads (train/data.py): also PPM/PGM files.
FILE_FORMATS = (*FORMATS, "PPM")
_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF", "PPM": "PPM/PGM"}
# Smaller than this and there is nothing to classify (the models see 32x32 or 48x48 pixels).
MIN_SIDE = 8

PALETTE_MODES = frozenset({"P", "PA"})
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class BadImage(ValueError):
    """The upload cannot be classified; the message is shown to the user as is."""


@dataclass
class Decoded:
    rgb: np.ndarray  # (H, W, 3) uint8
    notes: list[str] = field(default_factory=list)  # conversions the user should know about
    source_size: tuple[int, int] = (0, 0)  # (width, height) as uploaded, upright (EXIF orientation applied)
    mode: str = ""


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images to 0..255 by their real range (PIL's convert clips)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (arr.dtype == np.uint16):
        arr = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    else:  # "I" (int32) or "F": stretch the actual range
        arr = arr.astype(np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        arr = np.nan_to_num(arr).round().astype(np.uint8)
    out = Image.fromarray(arr)
    out.info = dict(im.info)  # an EXIF orientation stays with the picture
    return out


def _shrink(im: Image.Image) -> Image.Image:
    """``im`` with its longest side cut to MAX_SIDE (aspect kept); palette and 1-bit images first
    become RGB(A)/L, which resample properly."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    try:
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    except ValueError:  # a mode Pillow does not resample
        im = im.convert("RGBA")
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return im


def channel_note(mode: str, channels: int | None) -> str | None:
    """The note naming the colour conversion an upload of Pillow ``mode`` needs for a model with
    ``channels`` input channels (3: RGB, 1: grayscale), or None when it needs none."""
    if channels not in (1, 3):
        return None
    target = "RGB" if channels == 3 else "grayscale"
    if mode in PALETTE_MODES:
        return f"Converted palette image to {target}."
    if mode in GRAY_MODES:
        return "Converted grayscale image to RGB (the model expects colour)." if channels == 3 else None
    if channels == 1:
        return "Converted colour image to grayscale (the model expects one channel)."
    if mode not in ("RGB", "RGBA", "RGBa", "RGBX"):  # CMYK, YCbCr, LAB, HSV
        return f"Converted {mode} image to RGB."
    return None


def format_names(formats: tuple[str, ...]) -> str:
    """"PNG, JPEG, ... or TIFF": the formats as a user knows them."""
    names = [_NAMES.get(f, f) for f in formats]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def decode_image(source: str | Path | bytes | None, channels: int | None = None,
                 formats: tuple[str, ...] = FORMATS) -> Decoded:
    """Open ``source`` (a file, or an image's bytes) defensively; raise :class:`BadImage` with a
    user-facing reason on failure. With ``channels`` (the model's: 3 or 1) the notes also name the
    colour conversion it needs. Only ``formats`` are decoded."""
    if source is None:
        raise BadImage("No image given: upload a photo, paste one, or click an example.")
    names = format_names(formats)
    if isinstance(source, bytes | bytearray):
        size, opened = len(source), io.BytesIO(source)
    else:
        opened = Path(source)
        try:
            size = opened.stat().st_size
        except OSError:
            raise BadImage("The upload did not arrive; please try again.") from None
    if size == 0:
        raise BadImage(f"The file is empty (0 bytes); upload a {names} image.")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # own limit below
            im = Image.open(opened, formats=formats)
            w, h = im.size
            if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale straight away when that is enough
                im.draft(im.mode, (MAX_SIDE, MAX_SIDE))
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise BadImage(
                    f"The image is {w}x{h} pixels ({w * h / 1e6:.0f} MP); the limit is {MAX_PIXELS / 1e6:.0f} MP. "
                    "Please upload a smaller image."
                )
            if min(w, h) < MIN_SIDE:
                raise BadImage(f"The image is only {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed to classify it.")
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                im.seek(0)
                notes.append(f"Animated image with {frames} frames: classified the first frame.")
            im.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(f"This file is not an image reslab accepts: upload a {names} image.") from None
    except Image.DecompressionBombError:
        raise BadImage(f"The image is too large to decode safely (limit {MAX_PIXELS / 1e6:.0f} MP).") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError):  # the reason goes to no one: it may name paths
        raise BadImage("The image file is truncated or corrupt.") from None
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # before shrinking: Pillow resamples few of these modes
        notes.append(f"{'16' if mode.startswith('I;16') else '32'}-bit image scaled to 8 bits.")
        im = _to_8bit(im)
    if max(im.size) > MAX_SIDE:  # before any conversion copies the full-size picture
        im = _shrink(im)
        if min(im.size) < MIN_SIDE:
            raise BadImage(f"The image is {w}x{h} pixels: too narrow to classify once fitted into "
                           f"{MAX_SIDE}x{MAX_SIDE} (at most {MAX_SIDE // MIN_SIDE}:1).")
    stored = im.size
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF must not stop a readable image
        pass
    if im.size != stored and im.size == stored[::-1]:  # turned a quarter by its EXIF orientation
        w, h = h, w  # sizes are the picture's as a viewer shows it, like the boxes found in it
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "RGBa"):
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("Transparent areas were flattened onto white.")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    note = channel_note(mode, channels)
    if note:
        notes.append(note)
    return Decoded(rgb=rgb, notes=notes, source_size=(w, h), mode=mode)
