"""The half-precision decode product kernel (csrc/nn/cuda_half_gemv.cpp), run on this machine's CPU.

Its source, as MLX receives it (compacted), is compiled as host C++ with every thread of a block a std::thread
(tests/unit/cuda_emulator.py): a warp a weight row, four 16-byte chunks a lane in flight, then the chunks left one at a
time, the lanes' sums meeting by shuffles. Checked against numpy's float64 x W^T for one to four rows of x, rows of a
single chunk up to rows that take both loops, a weight whose row count leaves a block's last warps idle, and rows not
16-byte aligned (the element-by-element loads). What this cannot check, tests/gpu/test_measuring_switches.py does on
CUDA: NVRTC's view of the source; the speed is benchmarks/gpu/matvec_bench.py --half's.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import PRELUDE, block_launcher, compile_library, from_bf16_bits, kernel_source, to_bf16_bits

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "nn" / "cuda_half_gemv.cpp"
WARPS = 8  # kWarpsPerBlock


def build(tmp_path: Path, dtype: str, rows: int) -> ctypes.CDLL:
    helpers = kernel_source(SOURCE, "kHalfGemvHelpers")
    source = kernel_source(SOURCE, "kHalfGemvSource")
    params = "const T* x, const T* w, const int* w_shape, T* out"
    code = PRELUDE + helpers + f"""
using T = {dtype};
constexpr int ROWS = {rows};
static void kernel({params}) {{
{source}
}}
"""
    blocks = f"(w_shape[0] + {WARPS} - 1) / {WARPS}"
    return compile_library(tmp_path, code + block_launcher(params, "x, w, w_shape, out", blocks, 32 * WARPS))


def as_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    return to_bf16_bits(a) if dtype == "__nv_bfloat16" else a.astype(np.float16).view(np.uint16)


def from_bits(b: np.ndarray, dtype: str) -> np.ndarray:
    return from_bf16_bits(b) if dtype == "__nv_bfloat16" else b.view(np.float16).astype(np.float32)


CASES = [  # (weight rows N, K): K / 8 chunks a row
    (37, 8),      # one chunk a row: lanes 1-31 idle; 37 rows leave the last block's warps 5-7 without a row
    (16, 136),    # 17 chunks: the one-at-a-time loop only
    (9, 1032),    # 129 chunks: lanes 0-32 of the four-in-flight loop, then the rest one at a time
    (8, 2056),    # 257 chunks: two passes of four for some lanes
]


@pytest.mark.parametrize("dtype", ["__nv_bfloat16", "__half"])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize(("n", "k"), CASES)
def test_the_kernel_gives_x_times_the_weight(tmp_path, dtype, rows, n, k):
    rng = np.random.default_rng(n * k + rows)
    x_bits = as_bits(rng.standard_normal((rows, k)).astype(np.float32), dtype)
    w_bits = as_bits((rng.standard_normal((n, k)) * 0.1).astype(np.float32), dtype)
    out = np.zeros((rows, n), np.uint16)
    lib = build(tmp_path, dtype, rows)
    ptr = ctypes.c_void_p
    shape = np.array([n, k], np.int32)
    lib.run(*[ptr(a.ctypes.data) for a in (x_bits, w_bits, shape, out)])
    exact = from_bits(x_bits, dtype).astype(np.float64) @ from_bits(w_bits, dtype).astype(np.float64).T
    # float sums of exact products, rounded once to the dtype: within its half ulp, plus the float sum's own error
    ulp = 2.0 ** -8 if dtype == "__nv_bfloat16" else 2.0 ** -11
    np.testing.assert_allclose(from_bits(out, dtype), exact, rtol=ulp, atol=1e-5 * np.abs(exact).max())


def test_rows_off_a_16_byte_boundary_take_the_element_loads(tmp_path):
    """x and the weight one element past an aligned address (a view into a larger buffer): every chunk is read element
    by element, with the same sums."""
    dtype, rows, n, k = "__nv_bfloat16", 2, 11, 1032
    rng = np.random.default_rng(5)
    x_buffer = to_bf16_bits(rng.standard_normal(rows * k + 8).astype(np.float32))
    w_buffer = to_bf16_bits((rng.standard_normal(n * k + 8) * 0.1).astype(np.float32))
    # One element past the buffer's start, or two if that happens to be a 16-byte boundary.
    x_at = x_buffer.ctypes.data + (2 if (x_buffer.ctypes.data + 2) % 16 else 4)
    w_at = w_buffer.ctypes.data + (2 if (w_buffer.ctypes.data + 2) % 16 else 4)
    assert x_at % 16 != 0 and w_at % 16 != 0
    x = from_bf16_bits(np.frombuffer((ctypes.c_uint16 * (rows * k)).from_address(x_at), np.uint16)).reshape(rows, k)
    w = from_bf16_bits(np.frombuffer((ctypes.c_uint16 * (n * k)).from_address(w_at), np.uint16)).reshape(n, k)
    out = np.zeros((rows, n), np.uint16)
    shape = np.array([n, k], np.int32)
    lib = build(tmp_path, dtype, rows)
    lib.run(ctypes.c_void_p(x_at), ctypes.c_void_p(w_at), ctypes.c_void_p(shape.ctypes.data),
            ctypes.c_void_p(out.ctypes.data))
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(from_bf16_bits(out), exact, rtol=2.0 ** -8, atol=1e-5 * np.abs(exact).max())
