"""Images in and out: decoded pixels -> PIL, PNG bytes with metadata, base64."""

from __future__ import annotations

import base64
import io
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import numpy as np
from PIL import Image

from mlxrunner.imagegen.png import encode_png

T = TypeVar("T")


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


# The server's PNGs are encoded here, not on the MLX worker, so the worker starts the next job at
# once (zlib releases the GIL). One thread: images leave in the order they were made (png.py spreads
# each image's compression over the cores).
_png_encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="png")


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """The RGB image as PNG, with `text` as iTXt chunks (prompt, seed, steps, ...)."""
    return encode_png(np.asarray(image.convert("RGB")), text)


def png_base64(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """The PNG in base64 as ASCII bytes: the JSON writers put them in a line as they are
    (protocol.ndjson_line), without a str copy and json.dumps' escaping scan."""
    return base64.b64encode(png_bytes(image, text))


# OpenAI's `output_format` values -> Pillow's encoders. PNG keeps its own faster writer and its metadata.
PILLOW_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}


def encoded_base64(image: Image.Image, output_format: str = "png", quality: int = 100,
                   text: dict[str, str] | None = None) -> bytes:
    """The image in `output_format` (png, jpeg, webp) as base64 ASCII bytes; `quality` (0-100) sets the
    lossy formats' quality, 100 the best (at 100 WebP is lossless)."""
    if output_format == "png":
        return png_base64(image, text)
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": quality}
    if output_format == "webp" and quality == 100:
        options = {"lossless": True}
    elif output_format == "jpeg" and quality >= 90:
        options["subsampling"] = 0  # full-resolution colour: at high quality, 4:2:0 would be most of the error
    image.convert("RGB").save(buffer, PILLOW_FORMATS[output_format], **options)
    return base64.b64encode(buffer.getvalue())


def on_png_thread(encode: Callable[..., T], *args: Any) -> Future[T]:
    """encode(*args) on the PNG thread; the server awaits the future outside the MLX worker."""
    return _png_encoder.submit(encode, *args)


# --- request images (reference images for editing) ---------------------------------------------

MAX_ASPECT = 8.0


class BadImage(ValueError):
    """A request image that cannot be used; the message names which one and why."""


ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_request_images(blobs: list[bytes], limits) -> list[Image.Image]:
    """Decode the request's `images` into RGB PIL images, or raise BadImage naming the culprit."""
    return [decode_image(blob, f'images[{i}]', limits) for i, blob in enumerate(blobs)]


def decode_image(blob: bytes, name: str, limits) -> Image.Image:
    """Bytes (PNG, JPEG or WebP) -> an RGB image with EXIF orientation applied and any alpha
    composited on white. Refuses other formats, non-images, truncated files, decompression bombs
    (judged from the header, before decoding), sides outside [min_image_side, max_image_side] and
    aspect ratios > 8."""
    from PIL import ImageOps, UnidentifiedImageError

    try:
        # Only the formats the README promises: each other PIL decoder (GIF, BMP, TIFF, ICO, PPM...)
        # is more code that hostile bytes could reach.
        image = Image.open(io.BytesIO(blob), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise BadImage(f'"{name}" is not an image the runner reads (PNG, JPEG or WebP only)') from None
    except Exception as exc:  # PIL raises many types for hostile headers
        raise BadImage(f'"{name}" could not be opened: {exc}') from None
    check_dimensions(name, *image.size, limits.min_image_side, limits.max_image_side)
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data
        raise BadImage(f'"{name}" is damaged or truncated: {exc}') from None
    return to_rgb(ImageOps.exif_transpose(image))


def check_dimensions(name: str, width: int, height: int, min_side: int, max_side: int | None = None) -> None:
    """Refuse sides outside [min_side, max_side] and aspect ratios beyond MAX_ASPECT:1."""
    if max_side is not None and max(width, height) > max_side:
        raise BadImage(f'"{name}" is {width}x{height}; the largest side allowed is {max_side} px')
    if min(width, height) < min_side:
        raise BadImage(f'"{name}" is {width}x{height}; each side must be at least {min_side} px')
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise BadImage(f'"{name}" is {width}x{height}; the aspect ratio must be at most {MAX_ASPECT:g}:1')


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit greyscale scaled down (convert("RGB") would clip every value above 255 to
    white), any alpha composited on white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")
