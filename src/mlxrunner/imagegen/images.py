"""Images in and out: decoded pixels -> PIL, PNG bytes with metadata, base64."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def to_uint8(pixels) -> np.ndarray:
    """VAE output in [-1, 1] (float, [H, W, 3], any float dtype already mapped to [0, 1]) -> uint8.

    `pixels` are the clamped [0, 1] values; as diffusers' image processor does: x 255, round half
    to even (np.round), cast.
    """
    array = np.asarray(pixels, dtype=np.float32)
    return np.round(array * 255.0).astype(np.uint8)


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """The image as PNG, with `text` as tEXt/iTXt chunks (prompt, seed, steps, ...)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt survives
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def png_base64(image: Image.Image, text: dict[str, str] | None = None) -> str:
    return base64.b64encode(png_bytes(image, text)).decode("ascii")
