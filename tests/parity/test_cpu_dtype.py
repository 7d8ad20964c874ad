"""On the CPU, bf16 checkpoints of image and embedding models compute in float32 (upcast at load), because
MLX's CPU backend has no BLAS path for half-precision matrix products; `--cpu-dtype stored` keeps them."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from image_helpers import computing_as_stored

from mlxrunner.imagegen import load_pipeline

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zimage-tiny"
REQUEST = dict(width=64, height=64, steps=2, seed=3)
COMPONENTS = ("text_encoder", "transformer", "vae")

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the upcast applies on the CPU only")


def rewritten(out: Path, dtype: mx.Dtype, via: mx.Dtype | None = None) -> Path:
    """The tiny Z-Image with every float weight stored as `dtype` (rounded through `via` first)."""
    shutil.copytree(FIXTURE, out)
    for component in COMPONENTS:
        for path in (out / component).glob("*.safetensors"):
            weights = mx.load(str(path))
            weights = {name: (w.astype(via) if via else w).astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w
                       for name, w in weights.items()}
            mx.save_safetensors(str(path), weights)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu-dtype")
    return rewritten(root / "bf16", mx.bfloat16), rewritten(root / "f32-of-bf16", mx.float32, via=mx.bfloat16)


def test_bf16_weights_compute_in_float32_and_draw_what_their_float32_copy_draws(folders):
    bf16, f32_copy = folders
    pipe = load_pipeline(str(bf16))
    assert pipe.vae.dtype == mx.float32
    # The upcast is exact, so the image is the float32 model's (holding the same rounded values), bit for bit.
    ours = np.asarray(pipe.generate("a red fox", **REQUEST))
    assert np.array_equal(ours, np.asarray(load_pipeline(str(f32_copy)).generate("a red fox", **REQUEST)))


def test_stored_keeps_bf16(folders):
    with computing_as_stored():
        pipe = load_pipeline(str(folders[0]))
    assert pipe.vae.dtype == mx.bfloat16
    image = np.asarray(pipe.generate("a red fox", **REQUEST))
    assert image.shape == (64, 64, 3) and image.std() > 0
