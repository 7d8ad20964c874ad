"""Known traps of MLX on CUDA, checked where MLX computes on a GPU (and, where cheap enough, on the CPU too).

- Convolutions with >= 65,536 output positions once failed on CUDA (grid dimensions over 65,535):
  every VAE decode from 256 x 256 up. Checked on any device against a NumPy convolution, and on a
  GPU through the whole VAE: at 1024 against the same C++ decoder on the CPU stream, at 2048 in
  tiles (an untiled 2048 pass crashes MLX's CUDA backend: refused by Vae).
- Host reads of GPU arrays (token ids, position ids, images): every test that reads a result checks
  them; csrc/nn/host.h routes the C++ reads through a CPU-stream copy.
- Warm runners that hang or grow: two 1024 x 1024 generations in a row on a warm pipeline.
- Out of memory: a GPU allocation failure fails that request with an error that says so; the
  runner keeps serving.
The GPU-only checks are skipped on a CPU (a full-VAE decode at 2048 takes minutes there).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU, float32_tol
from image_helpers import rel_error

from mlxrunner.imagegen import load_pipeline
from mlxrunner.launcher import Runner, RunnerError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zimage-tiny"
ON_CUDA = ON_GPU and mx.cuda.is_available()
gpu_only = pytest.mark.skipif(not ON_GPU, reason="a GPU trap; on the CPU the convolution test covers the shapes")


def numpy_conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Same-padded 3x3 convolution, NHWC input, MLX weight layout [out, kh, kw, in], in float64."""
    size_h, size_w = x.shape[1], x.shape[2]
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, i:i + size_h, j:j + size_w, :] @ w[:, i, j, :].T.astype(np.float64)
               for i in range(3) for j in range(3))


@pytest.mark.parametrize("size", [1024, 2048])
def test_convolution_with_more_than_65536_output_positions(size):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((1, size, size, 4)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 4)).astype(np.float32)
    y = mx.conv2d(mx.array(x), mx.array(w), padding=1)
    assert y.shape == (1, size, size, 8)
    assert rel_error(np.asarray(y), numpy_conv3x3(x, w)) < float32_tol(1e-5, 5e-3)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(FIXTURE))


@gpu_only
@pytest.mark.timeout(180)
def test_vae_decode_at_1024_matches_the_cpu(pipe):
    latents = mx.array(np.random.default_rng(1).standard_normal((1, 16, 128, 128)).astype(np.float32))
    on_gpu = pipe.vae.decode_float(latents, tile=None)
    with mx.stream(mx.cpu):
        on_cpu = pipe.vae.decode_float(latents, tile=None)
    assert on_gpu.shape == (1024, 1024, 3) and np.isfinite(on_gpu).all()
    assert rel_error(on_gpu, on_cpu) < 2e-2  # TF32 products through ~30 convolutions and a GroupNorm chain


@gpu_only
@pytest.mark.timeout(180)
def test_vae_decode_at_2048_in_tiles(pipe):
    """2048 x 2048 as requests decode it: in 1024-pixel tiles. (One untiled 2048 x 2048 pass killed the
    process with SIGFPE inside MLX 0.32.4's CUDA backend on an H100; Vae refuses it, see vae.py.)"""
    latents = mx.array(np.random.default_rng(2).standard_normal((1, 16, 256, 256)).astype(np.float32))
    image = pipe.vae.decode_float(latents, tile=None)
    assert image.shape == (2048, 2048, 3) and np.isfinite(image).all()
    assert image.std() > 1e-2 and 0.05 < image.mean() < 0.95  # a picture, not a constant


@gpu_only
@pytest.mark.timeout(180)
def test_two_warm_1024_generations_neither_hang_nor_grow_memory(pipe):
    request = dict(width=1024, height=1024, steps=2, seed=7)
    pipe.run("a lighthouse", **request)  # warm: first-use allocations, kernels compiled
    results, active, cached = [], [], []
    for _ in range(4):
        results.append(pipe.run("a lighthouse", **request))
        active.append(mx.get_active_memory())
        cached.append(mx.get_cache_memory())
    # One-time growth is allowed (an H100 kept 1 MB more after the second run: a cached kernel
    # plan); a leak would add at least the 12 MB of a 1024 x 1024 float32 image every run.
    assert active[-1] - active[1] < 4 << 20, f"active memory grows run after run: {active}"
    # The pipeline keeps MLX's buffer cache between runs (the runner gives it back once idle): each run
    # reuses the previous run's buffers, so the cache does not grow either.
    assert max(cached) - min(cached) < 256 << 20, f"the buffer cache grows run after run: {cached}"
    mx.clear_cache()
    assert mx.get_cache_memory() < 4 << 20  # all of it can be given back (but MLX CUDA's small-buffer pool)
    assert all(np.array_equal(np.asarray(results[0].image), np.asarray(r.image)) for r in results)


def gpu_free_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout.split()[0]) << 20


@pytest.mark.skipif(not ON_CUDA or shutil.which("nvidia-smi") is None,
                    reason="fills a CUDA GPU's memory from a second process (Metal shares it with the system)")
@pytest.mark.timeout(240)
def test_out_of_memory_fails_the_request_not_the_runner():
    small = {"prompt": "a boat", "width": 256, "height": 256, "steps": 1, "seed": 1}
    with Runner.start(str(FIXTURE), timeout=120) as runner:
        assert list(runner.complete(small))[-1]["done"]
        # Take all but ~256 MB of what is free now, so the runner's next big allocation fails.
        # In 1 GiB pieces: one 79 GB fill kernel overflows MLX's CUDA launch limits itself.
        hog = [mx.zeros((1 << 30,), dtype=mx.uint8) for _ in range((gpu_free_bytes() - (512 << 20)) >> 30)]
        mx.eval(hog)
        hog += [mx.zeros((64 << 20,), dtype=mx.uint8) for _ in range((gpu_free_bytes() - (192 << 20)) >> 26)]
        mx.eval(hog)
        try:
            with pytest.raises(RunnerError) as failure:
                list(runner.complete({**small, "width": 2048, "height": 2048}))
        finally:
            del hog
            mx.clear_cache()
        assert "out of memory" in str(failure.value).lower(), str(failure.value)
        assert runner.process.poll() is None, "the runner died"
        final = list(runner.complete(small))[-1]
        assert final["done"] and "image" in final and "error" not in final


def test_untiled_decode_above_the_safe_size_is_refused_before_any_work(pipe):
    latents = mx.zeros((1, 16, 256, 256))
    with pytest.raises(ValueError, match="untiled VAE decode of 256 x 256 latents is refused"):
        pipe.vae.decode_float(latents, tile=0)
