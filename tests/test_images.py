"""The one decoder for the demo, `reslab predict` and the REST model (train/images.py): files and bytes
decode alike, and the cases each way in used to get differently (16-bit, EXIF orientation, formats,
a JPEG larger than the pixel limit, a picture too thin to classify)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from train.images import FILE_FORMATS, MAX_PIXELS, MAX_SIDE, BadImage, decode_image


def encoded(im: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    """An RGB picture whose every row and column differs, so a turn or a mirror shows."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def test_bytes_and_a_file_decode_to_the_same_pixels(tmp_path):
    png = encoded(gradient(40, 30), "PNG")
    (tmp_path / "a.png").write_bytes(png)
    from_file, from_bytes = decode_image(tmp_path / "a.png"), decode_image(png)
    assert from_file.rgb.shape == (30, 40, 3) and np.array_equal(from_file.rgb, from_bytes.rgb)
    assert from_bytes.source_size == (40, 30)
    with pytest.raises(BadImage, match=r"empty \(0 bytes\)"):
        decode_image(b"")


def test_sixteen_bit_images_are_scaled_not_clipped_to_white():
    """A 16-bit grayscale PNG (Pillow's I;16) is scaled to 8 bits (>> 8); PIL's convert would clip every
    value above 255 to white, as the REST model's own decoder did."""
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    decoded = decode_image(encoded(Image.fromarray(values), "PNG"), channels=1)
    assert decoded.mode.startswith("I") and "16-bit image scaled to 8 bits." in decoded.notes
    np.testing.assert_array_equal(decoded.rgb[..., 0], (values >> 8).astype(np.uint8))
    # larger than MAX_SIDE: scaled before it is shrunk (Pillow does not resample I;16)
    big = np.full((MAX_SIDE * 2, MAX_SIDE + 8), 40000, np.uint16)
    decoded = decode_image(encoded(Image.fromarray(big), "PNG"))
    assert max(decoded.rgb.shape[:2]) == MAX_SIDE and abs(int(decoded.rgb.mean()) - (40000 >> 8)) <= 1


def test_an_exif_turned_photo_is_upright_and_sized_as_shown():
    """Orientation 6 (turn 90 degrees clockwise to show): the pixels come back upright and the size is the
    shown one, so face boxes found in it map back onto the picture a viewer sees. Also when the photo is
    larger than MAX_SIDE and shrunk before it is turned."""
    upright = gradient(300, 200)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encoded(stored, "PNG", exif=exif))
    assert decoded.source_size == (300, 200) and decoded.rgb.shape == (200, 300, 3)
    assert np.abs(decoded.rgb.astype(int) - np.asarray(upright, dtype=int)).max() <= 2
    big = gradient(3000, 2000).transpose(Image.Transpose.ROTATE_90)
    decoded = decode_image(encoded(big, "JPEG", exif=exif, quality=90))
    assert decoded.source_size == (3000, 2000)  # stored as 2000x3000
    h, w = decoded.rgb.shape[:2]
    assert w == MAX_SIDE and abs(h - MAX_SIDE * 2 / 3) <= 1


def test_only_the_formats_asked_for_are_opened():
    """EPS is handed to Ghostscript by Pillow: never opened, from bytes (REST) or a file. PPM/PGM, which
    training reads, are opened where `reslab predict` asks for them."""
    picture = gradient(32, 32)
    with pytest.raises(BadImage, match="not an image reslab accepts: upload a PNG, JPEG, WebP, GIF, BMP or TIFF image"):
        decode_image(encoded(picture, "EPS"))
    pgm = encoded(picture.convert("L"), "PPM")
    with pytest.raises(BadImage, match="not an image reslab accepts"):
        decode_image(pgm)
    decoded = decode_image(pgm, formats=FILE_FORMATS)
    assert decoded.rgb.shape == (32, 32, 3) and decoded.mode == "L"
    with pytest.raises(BadImage, match="upload a PNG, JPEG, WebP, GIF, BMP, TIFF or PPM/PGM image"):
        decode_image(b"not a picture", formats=FILE_FORMATS)


def test_a_jpeg_counts_at_the_scale_it_is_decoded_at():
    """A 24 MP camera JPEG decodes at half scale (6 MP) and is classified; a PNG of as many pixels is
    refused, since it would decode whole."""
    w, h = 6000, 4000
    assert w * h > MAX_PIXELS
    photo = Image.new("RGB", (w, h), (90, 120, 150))
    decoded = decode_image(encoded(photo, "JPEG", quality=70))
    assert decoded.source_size == (w, h) and max(decoded.rgb.shape[:2]) == MAX_SIDE
    with pytest.raises(BadImage, match=r"The image is 6000x4000 pixels \(24 MP\); the limit is 16 MP"):
        decode_image(encoded(Image.new("L", (w, h)), "PNG"))


def test_a_picture_too_thin_to_classify_once_fitted_is_refused():
    """16000x8 passes the 8-pixel minimum but would be 1024x1 once fitted: one pixel row, nothing to see."""
    with pytest.raises(BadImage, match=r"16000x8 pixels: too narrow to classify once fitted into 1024x1024"):
        decode_image(encoded(Image.new("RGB", (16000, 8)), "PNG"))
    assert decode_image(encoded(Image.new("RGB", (8000, 64)), "PNG")).rgb.shape == (8, MAX_SIDE, 3)
