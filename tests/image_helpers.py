"""Helpers the image-generation tests share: numeric comparison, GroupNorm in float64, diffusers' image bytes and
reference pixels, bf16 fixture copies, talking to a runner's image /completion stream, and where a tiled VAE pass lets
a cancel land."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlxrunner import backend
from mlxrunner.errors import Cancelled
from mlxrunner.settings import DEFAULT_CPU_DTYPE


def group_norm_float64(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int, eps: float,
                       then_silu: bool = False) -> np.ndarray:
    """PyTorch's GroupNorm in float64 (statistics per sample and group over the pixels and the group's channels, biased
    variance) of x [B, H, W, C], then SiLU if then_silu."""
    b, h, w, c = x.shape
    grouped = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = ((grouped - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((grouped - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * weight + bias
    return y / (1 + np.exp(-y)) if then_silu else y


def to_uint8(pixels) -> np.ndarray:
    """diffusers' bytes of an image in [0, 1] (float, [H, W, 3]), made on the host: x 255 in float32, round half to
    even (np.round), cast. The reference for the pipeline's, which are made on the device (vae.to_uint8_on_device)."""
    return np.round(np.asarray(pixels, dtype=np.float32) * 255.0).astype(np.uint8)


def reference_pixels(image, name: str = "images[0]") -> np.ndarray:
    """diffusers' preprocessed reference image: float32 [1, 3, h', w'] in [-1, 1] (the pipeline's crop and encoder
    input, laid out as the goldens hold it)."""
    from mlxrunner.imagegen.flux2_klein import encoder_input, reference_crop

    return np.asarray(encoder_input(reference_crop(image, name))).transpose(0, 3, 1, 2)


def rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (shapes must agree)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def convert_folder_to_bf16(source: Path, target: Path) -> None:
    """Copy a diffusers folder with every floating-point tensor stored as bf16 (what
    save_pretrained(torch_dtype=bfloat16) writes)."""
    shutil.copytree(source, target)
    for path in target.rglob("*.safetensors"):
        arrays = mx.load(str(path))
        mx.save_safetensors(str(path), {k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
                                        for k, v in arrays.items()})


@contextmanager
def computing_as_stored() -> Iterator[None]:
    """Load as with --cpu-dtype stored: the bf16 parity cases check bf16 arithmetic against diffusers' bf16 run,
    and on the CPU the runner would otherwise compute them in float32."""
    backend.set_cpu_dtype("stored")
    try:
        yield
    finally:
        backend.set_cpu_dtype(DEFAULT_CPU_DTYPE)


def post(runner, body: dict | str | bytes, path: str = "/completion",
         timeout: float = 120) -> tuple[int, str | None, bytes]:
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=timeout)
    try:
        if isinstance(body, dict):
            body = json.dumps(body)
        conn.request("POST", path, body=body,
                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def generate_with(runner, base: dict, **fields) -> tuple[list[dict], dict]:
    """POST `base` with `fields` changed (None removes one); return (progress lines, final line)."""
    body = {**base, **fields}
    body = {k: v for k, v in body.items() if v is not None}
    status, ctype, raw = post(runner, body)
    assert status == 200, raw[:500]
    assert ctype == "application/x-ndjson"
    lines = [json.loads(line) for line in raw.split(b"\n")[:-1]]
    assert lines and lines[-1]["done"] is True and "error" not in lines[-1], lines[-1:]
    return lines[:-1], lines[-1]


def png_of(final: dict) -> Image.Image:
    data = base64.b64decode(final["image"], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def pixels(final: dict) -> np.ndarray:
    return np.asarray(png_of(final).convert("RGB"))


def same(a: dict, b: dict) -> bool:
    return np.array_equal(pixels(a), pixels(b))


def check_cancel_lands_between_tiles(run: Callable[[int, Callable[[], None]], object], tile: int, tiles: int) -> int:
    """A VAE pass, run(tile, check_cancelled) (tile 0: in one piece), checks for a cancel between its blocks, and
    tiled between each tile's blocks and once between tiles; a cancel raised in the second tile stops it there.
    Returns how many checks the untiled pass made."""
    calls = {"untiled": 0, "tiled": 0}

    def counter(name):
        def check():
            calls[name] += 1
        return check

    run(0, counter("untiled"))
    run(tile, counter("tiled"))
    assert calls["tiled"] == tiles * (calls["untiled"] + 1)  # each tile's blocks, then once between tiles

    seen = []

    def cancel_in_the_second_tile():
        seen.append(1)
        if len(seen) == calls["untiled"] + 2:
            raise Cancelled("client disconnected")

    with pytest.raises(Cancelled):
        run(tile, cancel_in_the_second_tile)
    assert len(seen) == calls["untiled"] + 2
    return calls["untiled"]
