"""Around the denoiser, on the CPU: first request, HTTP + PNG out, memory per phase, bf16 checkpoints.

    HF_HUB_OFFLINE=1 python -m pytest benchmarks/cpu/test_image_serving.py -q -s

On the "small" random-weight Z-Image of benchmarks/zimage_models.py (float32; a bf16 copy for the dtype case).
The measurements are benchmarks/image_serving.py's, which also runs on a GPU; results in benchmarks/README.md.
Each test prints its numbers as JSON and checks what must hold whatever the timing (images equal, peaks lower).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from benchmarks import image_serving, zimage_models
from mlxrunner import backend
from mlxrunner.imagegen import load_pipeline

pytest.importorskip("diffusers", reason="the benchmark models are written by diffusers' save_pretrained")

CACHE = Path(os.environ.get("MLXRUNNER_BENCH_CACHE", Path.home() / ".cache" / "mlxrunner-bench"))
SIZE, STEPS, ROUNDS = 256, 2, 3


@pytest.fixture(scope="module")
def small_folder() -> Path:
    return zimage_models.build(zimage_models.SMALL, CACHE / "zimage-small")


def report(name: str, result: dict) -> None:
    print(f"\n{name}: {json.dumps(result, indent=1)}")


def test_first_request_and_http_overhead(small_folder):
    result = image_serving.serving(small_folder, SIZE, STEPS, ROUNDS)
    report("serving", result)
    assert result["http_overhead_s"] >= 0


def test_png_out_old_and_new(small_folder):
    pixels = np.asarray(load_pipeline(str(small_folder)).generate(image_serving.PROMPT, width=SIZE, height=SIZE,
                                                                   steps=STEPS))
    big = np.asarray(Image.fromarray(pixels).resize((1024, 1024), Image.Resampling.BICUBIC))
    result = {"256": image_serving.png_out(pixels), "1024 (the 256 image resized)": image_serving.png_out(big)}
    report("png_out", result)


def test_memory_per_phase_normal_and_low_memory(small_folder):
    normal, low = (image_serving.memory(small_folder, SIZE, STEPS, low_memory) for low_memory in (False, True))
    report("memory", {"normal": normal, "low_memory": low})
    assert low["max_peak_bytes"] < normal["max_peak_bytes"]


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the upcast applies on the CPU only")
def test_bf16_checkpoint_upcast_or_stored(small_folder):
    folder = CACHE / "zimage-small-bf16"
    if not (folder / "model_index.json").exists():
        shutil.copytree(small_folder, folder, dirs_exist_ok=True)
        for path in folder.glob("*/*.safetensors"):
            weights = mx.load(str(path))
            mx.save_safetensors(str(path), {n: w.astype(mx.bfloat16) if w.dtype == mx.float32 else w
                                            for n, w in weights.items()})
    seconds = {}
    try:
        for dtype in ("float32", "stored"):
            backend.set_cpu_dtype(dtype)
            pipe = load_pipeline(str(folder))
            pipe.run("warm", width=64, height=64, steps=1)
            begun = time.perf_counter()
            pipe.run(image_serving.PROMPT, width=128, height=128, steps=1, seed=1)
            seconds[dtype] = time.perf_counter() - begun
    finally:
        backend.set_cpu_dtype("float32")
    ratio = seconds["stored"] / seconds["float32"]
    report("bf16 checkpoint, 128x128, 1 step", {**seconds, "stored_over_float32": ratio})
