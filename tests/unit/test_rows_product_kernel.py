"""The short chunk's product kernel (csrc/nn/cuda_rows_product.cpp, kRowsProductSource), run on this machine's CPU.

Its source is compiled as host C++ with every lane of a block a thread (tests/unit/cuda_emulator.py): mma.sync,
ldmatrix and cp.async are emulated from PTX's descriptions, so what is checked here is the kernel's bookkeeping
(which lane loads which rows of W and x, which sums land on which output, the split K's partial tiles, their
counter and the gated epilogue) against numpy. tests/gpu/test_rows_product.py checks it on CUDA against MLX's own
product.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import PRELUDE, block_launcher, compile_library, from_bf16_bits, kernel_source, to_bf16_bits

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "nn" / "cuda_rows_product.cpp"
TILE, ROWS, STEP, THREADS = 128, 64, 64, 128  # kTile, kRows, kStep, kThreads

# The device functions the kernel's header holds (kCudaMma, kCudaAsyncCopies, kRowsProductHelpers), emulated.
HOST_HELPERS = r"""
#include <atomic>
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __nv_bfloat16) {
  emulated_mma<__nv_bfloat16>(d, a, b);
}
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __half) {
  emulated_mma<__half>(d, a, b);
}
namespace mlxr_rows {
// cp.async as a plain copy (the block's barrier after the wait orders it on the GPU as here)
__device__ __forceinline__ void copy_16_async(void* shared, const void* global) { std::memcpy(shared, global, 16); }
__device__ __forceinline__ void copy_16_async_or_zero(void* shared, const void* global, bool real) {
  if (real) std::memcpy(shared, global, 16); else std::memset(shared, 0, 16);
}
__device__ __forceinline__ void commit_async_copies() {}
template <int N>
__device__ __forceinline__ void wait_async_copies() {}
// ldmatrix .x4: the warp's 32 row addresses meet, then lane l takes row l / 4 of each tile, elements 2 (l % 4), + 1
static const void* matrix_rows[32][32];
__device__ __forceinline__ void load_tiles(unsigned (&r)[4], const void* row) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  matrix_rows[warp][lane] = row;
  warps_tiles[warp].meet->arrive_and_wait();
  for (int m = 0; m < 4; ++m) {
    const auto* p = static_cast<const uint16_t*>(matrix_rows[warp][8 * m + (lane >> 2)]);
    r[m] = p[2 * (lane & 3)] | (static_cast<unsigned>(p[2 * (lane & 3) + 1]) << 16);
  }
  warps_tiles[warp].meet->arrive_and_wait();
}
__device__ __forceinline__ float4 load_coherent(const float* p) { return *reinterpret_cast<const float4*>(p); }
}  // namespace mlxr_rows
"""
PARAMS = ("const T* x, const int* x_shape, int x_ndim, const T* w, const int* w_shape, const int* counters, T* out, "
          "float* partials, int* next_counters")


def build(tmp_path: Path, dtype: str, gated: bool) -> ctypes.CDLL:
    """The kernel as a library: run(blocks, x, x_shape, x_ndim, w, w_shape, counters, out, partials, next_counters)."""
    body = kernel_source(SOURCE, "kRowsProductSource")
    # the dynamic shared memory the launch gives (kSharedBytes), as the emulator's block-wide static array
    dynamic = "extern __shared__ __align__(16) unsigned char smem[];"
    assert dynamic in body
    body = body.replace(dynamic, f"__shared__ __align__(16) unsigned char smem[{4 * (TILE + ROWS) * (STEP + 8) * 2}];")
    code = (PRELUDE + HOST_HELPERS + f"using T = {dtype};\nconstexpr bool GATED = {str(gated).lower()};\n" +
            f"static void kernel({PARAMS}) {{\n{body}\n}}\n")
    args = "x, x_shape, x_ndim, w, w_shape, counters, out, partials, next_counters"
    return compile_library(tmp_path / f"{dtype}_{gated}",
                           code + block_launcher(f"int blocks, {PARAMS}", args, "blocks", THREADS))


def half_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    return to_bf16_bits(a) if dtype == "__nv_bfloat16" else a.astype(np.float16).view(np.uint16)


def half_values(bits: np.ndarray, dtype: str) -> np.ndarray:
    return from_bf16_bits(bits) if dtype == "__nv_bfloat16" else bits.view(np.float16).astype(np.float32)


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    return half_values(half_bits(a, dtype), dtype)


CASES = [  # dtype, gated, rows of x, outputs (gated: I), k, splits
    ("__nv_bfloat16", False, 64, 256, 512, 1),  # two whole tiles, 8 steps: the pipeline wraps twice
    ("__nv_bfloat16", False, 20, 128, 640, 3),  # rows past x's last zero (a 16-row group skipped); 10 steps, 3 splits
    ("__half", False, 9, 128, 128, 1),          # the fewest rows; fewer steps (2) than the pipeline's depth
    ("__nv_bfloat16", True, 33, 128, 256, 2),   # gate|up: two 64-output tiles, 2 splits
    ("__half", True, 64, 64, 64, 1),
]


@pytest.mark.parametrize("dtype, gated, rows, outputs, k, splits", CASES)
def test_the_product_and_its_splits_match_numpy(tmp_path, dtype, gated, rows, outputs, k, splits):
    rng = np.random.default_rng(rows + outputs + k + splits)
    n = 2 * outputs if gated else outputs
    x = half_bits(rng.standard_normal((1, rows, k)), dtype)
    w = half_bits(rng.standard_normal((n, k)) * 0.1, dtype)
    tiles = outputs // (TILE // 2) if gated else outputs // TILE
    counters = np.zeros(tiles, np.int32)
    partials = np.full((tiles, splits, ROWS * TILE), np.nan, np.float32)
    lib = build(tmp_path, dtype, gated)
    ptr = ctypes.c_void_p
    for attempt in range(2):  # twice: the counters the first handed on must serve the second
        out = np.zeros((1, rows, outputs), np.uint16)
        next_counters = np.full(tiles, -1, np.int32)
        lib.run(ctypes.c_int(tiles * splits), ptr(x.ctypes.data), ptr(np.array(x.shape, np.int32).ctypes.data),
                ctypes.c_int(x.ndim), ptr(w.ctypes.data), ptr(np.array(w.shape, np.int32).ctypes.data),
                ptr(counters.ctypes.data), ptr(out.ctypes.data), ptr(partials.ctypes.data),
                ptr(next_counters.ctypes.data))
        if splits > 1:  # each tile's splits counted, and a zero handed on for each tile
            np.testing.assert_array_equal(counters, splits)
            np.testing.assert_array_equal(next_counters, 0)
            counters = next_counters
        product = half_values(x, dtype)[0].astype(np.float64) @ half_values(w, dtype).T.astype(np.float64)
        got = half_values(out, dtype)[0]
        if gated:
            gate, up = rounded(product[:, :outputs], dtype), rounded(product[:, outputs:], dtype)
            silu = rounded(gate * rounded(1 / (1 + np.exp(-gate)), dtype), dtype)
            want = rounded(silu * up, dtype)
        else:
            want = rounded(product, dtype)
        # float sums in another order than numpy's float64: at most a rounding step apart (one of T's ulps, and
        # through the gated SiLU's three roundings a few)
        ulps = 2.0 ** (-7 if dtype == "__nv_bfloat16" else -10) * (4 if gated else 1)
        np.testing.assert_allclose(got, want, rtol=ulps, atol=ulps * np.abs(want).max() * 0.05,
                                   err_msg=f"attempt {attempt}")
        assert np.abs(got).max() > 0.1  # a real signal
