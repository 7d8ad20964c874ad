"""The VAE's CUDA GroupNorm kernels (csrc/nn/cuda_group_norm.cpp), run on this machine's CPU.

Both kernels' sources, compacted as MLX receives them, are compiled as host C++ with every thread of a block a
std::thread (tests/unit/cuda_emulator.py) and launched as cuda_group_norm launches them: the sums kernel a block of
256 threads per (image, chunk of pixels), the chunks' sums added (the host code's mx::sum), then the apply kernel a
thread per 8 channels of a pixel. The result is held to GroupNorm (+ SiLU) in float64 on the same bfloat16 inputs,
within the output's rounding. The cases cover the VAE's channel counts (a group inside one thread's 8 channels, and
spread over several threads), chunks that do not divide the pixels, an image whose mean is far from zero against its
spread (what the shifted sums are for), and a constant group. What this cannot check, tests/gpu/test_vae_group_norm.py
does on CUDA: NVRTC's view of the source, MLX's launch, the speed.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import PRELUDE, block_launcher, compile_library, from_bf16_bits, kernel_source, to_bf16_bits
from image_helpers import group_norm_float64

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "nn" / "cuda_group_norm.cpp"
THREADS = 256  # both kernels' block
GROUPS = 32  # the VAE's


def build(tmp_path: Path, name: str, inputs: list[tuple[str, str]], output: tuple[str, str],
          constants: dict[str, int], silu: bool = False):
    """The kernel as run(blocks, threads, x, x_shape, x_strides, ..., out)."""
    element = {"T": "__nv_bfloat16", "float": "float"}
    params = []
    for input_name, kind in inputs:
        params += [f"const {element[kind]}* {input_name}", f"const int* {input_name}_shape",
                   f"const long long* {input_name}_strides"]
    params.append(f"{element[output[1]]}* {output[0]}")
    signature = ", ".join(params)
    args = ", ".join(p.split()[-1] for p in params)
    values = "".join(f"constexpr int {k} = {v};\n" for k, v in constants.items())
    code = (PRELUDE + "using T = __nv_bfloat16;\n" + values + f"#define SILU {int(silu)}\n" +
            f"static void kernel({signature}) {{\n{kernel_source(SOURCE, name)}\n}}\n" +
            block_launcher(f"int blocks, int threads, {signature}", args, "blocks", "threads"))
    return compile_library(tmp_path / name, code)


def launch(lib, blocks: int, inputs: list[np.ndarray], output: np.ndarray) -> None:
    ptr = ctypes.c_void_p
    held = []  # shapes and strides, alive until the call returns
    arguments = []
    for array in inputs:
        shape = np.array(array.shape, np.int32)
        strides = np.array([s // array.itemsize for s in array.strides], np.int64)
        held += [shape, strides]
        arguments += [ptr(array.ctypes.data), ptr(shape.ctypes.data), ptr(strides.ctypes.data)]
    lib.run(ctypes.c_int(blocks), ctypes.c_int(THREADS), *arguments, ptr(output.ctypes.data))


def run_group_norm(tmp_path: Path, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, silu: bool,
                   chunk_pixels: int, groups: int = GROUPS) -> np.ndarray:
    """cuda_group_norm's three steps on bfloat16 bits: sums kernel, the chunks' sums added, apply kernel."""
    b, h, w, c = x.shape
    pixels = h * w
    chunks = -(-pixels // chunk_pixels)
    x_bits = to_bf16_bits(x)
    sums_lib = build(tmp_path, "kGroupNormSums", [("x", "T")], ("sums", "float"),
                     {"C": c, "GROUPS": groups, "CHUNK_PIXELS": chunk_pixels})
    chunk_sums = np.zeros((b, chunks, groups, 2), np.float32)
    launch(sums_lib, b * chunks, [x_bits], chunk_sums)
    group_sums = np.ascontiguousarray(chunk_sums.sum(axis=1, dtype=np.float32))
    eps_bits = int(np.array(eps, np.float32).view(np.int32))
    apply_lib = build(tmp_path, "kGroupNormApply", [("x", "T"), ("sums", "float"), ("weight", "T"), ("bias", "T")],
                      ("out", "T"), {"C": c, "GROUPS": groups, "EPS_BITS": eps_bits}, silu)
    out = np.zeros(x.shape, np.uint16)
    vectors = b * pixels * c // 8
    launch(apply_lib, -(-vectors // THREADS), [x_bits, group_sums, to_bf16_bits(weight), to_bf16_bits(bias)], out)
    return from_bf16_bits(out)


def bf16(a: np.ndarray) -> np.ndarray:
    return from_bf16_bits(to_bf16_bits(a))


def inputs(shape, seed: int, offset: float = 0.0, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = bf16(offset + spread * rng.standard_normal(shape).astype(np.float32))
    weight = bf16(1 + 0.2 * rng.standard_normal(c).astype(np.float32))
    bias = bf16(0.1 * rng.standard_normal(c).astype(np.float32))
    return x, weight, bias


def assert_within_bf16_rounding(got: np.ndarray, want: np.ndarray) -> None:
    # The output is rounded once to bfloat16 (2^-8 relative); the float32 statistics add far less.
    error = np.abs(got - want)
    assert np.all(error <= 2.0 ** -8 * np.abs(want) + 2e-3 * np.max(np.abs(want))), float(np.max(error))


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(("shape", "groups", "chunk_pixels"), [
    ((1, 6, 7, 128), 32, 512),  # 4 channels a group: two groups in each thread's 8; one chunk
    ((2, 5, 9, 128), 32, 13),   # chunks that do not divide the 45 pixels, two images
    ((1, 4, 4, 512), 32, 5),    # 16 channels a group: a group over two threads
    ((1, 3, 5, 32), 32, 4),     # a channel a group (the tiny test VAEs' widths)
    ((1, 5, 6, 16), 8, 7),      # two channels a group, two threads a pixel
])
def test_group_norm_kernels_are_group_norm(tmp_path, silu, shape, groups, chunk_pixels):
    x, weight, bias = inputs(shape, seed=shape[-1] + chunk_pixels)
    got = run_group_norm(tmp_path, x, weight, bias, 1e-6, silu, chunk_pixels, groups)
    assert_within_bf16_rounding(got, group_norm_float64(x, weight, bias, groups, 1e-6, silu))


def test_a_mean_far_from_zero_keeps_its_variance(tmp_path):
    # The variance the apply kernel takes from the sums, S2 / n - (S1 / n)^2 in float32: from sums of raw values and
    # squares it would lose ~1e-3 of a spread of 32 under a mean of 3,000 (a cancellation of mean^2 / var ~ 9,000);
    # from sums shifted by a value of the group it keeps float32's precision.
    x, _, _ = inputs((1, 16, 16, 128), seed=3, offset=3000.0, spread=32.0)
    chunk_pixels = 16
    lib = build(tmp_path, "kGroupNormSums", [("x", "T")], ("sums", "float"),
                {"C": 128, "GROUPS": GROUPS, "CHUNK_PIXELS": chunk_pixels})
    chunk_sums = np.zeros((1, 256 // chunk_pixels, GROUPS, 2), np.float32)
    launch(lib, 256 // chunk_pixels, [to_bf16_bits(x)], chunk_sums)
    sums = chunk_sums.sum(axis=1, dtype=np.float32)[0]
    count = np.float32(256 * 128 // GROUPS)
    shifted_mean = sums[:, 0] / count
    variance = sums[:, 1] / count - shifted_mean * shifted_mean
    want = x.astype(np.float64).reshape(256, GROUPS, 128 // GROUPS).var(axis=(0, 2))
    np.testing.assert_allclose(variance, want, rtol=1e-4)


def test_a_constant_group_gives_its_bias(tmp_path):
    x, weight, bias = inputs((1, 4, 4, 128), seed=5)
    x[..., :4] = 2.5  # group 0 constant: variance 0, the normalised value 0
    got = run_group_norm(tmp_path, x, weight, bias, 1e-6, False, 512)
    np.testing.assert_array_equal(got[..., :4], np.broadcast_to(bias[:4], got[..., :4].shape))
