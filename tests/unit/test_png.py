"""imagegen/png.py: the runner's PNG writer gives back, through Pillow, exactly the pixels and text it was given."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mlxrunner.imagegen import png


def smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(height * width).normal(0, 4, (height, width, 3))
    return np.clip(np.stack([x * 0.7, y * 0.5, (x + y) * 0.3], -1) % 256 + noise, 0, 255).astype(np.uint8)


def noise(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, at = [], len(png.SIGNATURE)
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        at += 12 + length
    return out


@pytest.mark.parametrize("height, width", [(1, 1), (3, 7), (64, 64), (300, 200), (1024, 96)])
@pytest.mark.parametrize("pixels_of", [smooth, noise])
def test_pillow_reads_back_the_same_pixels(height, width, pixels_of):
    pixels = pixels_of(height, width)
    data = png.encode_png(pixels)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (width, height)
    assert np.array_equal(np.asarray(image), pixels)
    Image.open(io.BytesIO(data)).verify()


def test_the_bands_make_one_zlib_stream_of_up_filtered_rows():
    pixels = smooth(600, 80)  # several bands of MIN_BAND_ROWS rows
    idat = b"".join(body for kind, body in chunks(png.encode_png(pixels)) if kind == b"IDAT")
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(600, 1 + 80 * 3)
    assert (rows[:, 0] == png.UP_FILTER).all()
    assert np.array_equal(np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8), pixels.reshape(600, -1))


def test_text_survives_as_utf8():
    text = {"prompt": "ein Fuchs im Schnee, 雪の中の狐 ✓", "seed": "42", "empty": ""}
    image = Image.open(io.BytesIO(png.encode_png(smooth(8, 8), text)))
    assert image.text == text


def test_chunk_order_is_what_png_requires():
    kinds = [kind for kind, _ in chunks(png.encode_png(smooth(70, 70), {"a": "b"}))]
    assert kinds == [b"IHDR", b"iTXt", b"IDAT", b"IEND"]


@pytest.mark.parametrize("pixels", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                    np.zeros((4, 4, 4), np.uint8)])
def test_anything_but_uint8_rgb_is_refused(pixels):
    with pytest.raises(ValueError, match="uint8 RGB"):
        png.encode_png(pixels)
