"""CUDA's built-ins for a kernel source compiled as host C++ (tests/unit/test_tensor_core_matvec.py,
test_batch_attention_kernel.py): every thread of a block is a std::thread, a warp's lanes meet at a barrier for the
shuffles and the emulated mma.sync, bfloat16 is emulated bit for bit (round to nearest even)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
using std::min;
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx;
static Dim3 blockIdx, blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
static std::unique_ptr<std::barrier<>> block_barrier;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float __int_as_float(int bits) { float f; std::memcpy(&f, &bits, 4); return f; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t both = (static_cast<uint64_t>(y) << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<unsigned>((both >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return out;
}
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {  // round to nearest even
    uint32_t u; std::memcpy(&u, &f, 4);
    bits = static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  explicit operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16; float f; std::memcpy(&f, &u, 4); return f;
  }
};
struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v(static_cast<_Float16>(f)) {}
  explicit operator float() const { return static_cast<float>(v); }
};
// A pair of either half type, and the paired operations the kernel uses (computed in float, rounded once to H).
template <typename H> struct HalfPair { H x, y; };
using __nv_bfloat162 = HalfPair<__nv_bfloat16>;
using __half2 = HalfPair<__half>;
template <typename H> HalfPair<H> __hsub2(HalfPair<H> a, HalfPair<H> b) {
  return {H(float(a.x) - float(b.x)), H(float(a.y) - float(b.y))};
}
template <typename H> HalfPair<H> __hfma2(HalfPair<H> a, HalfPair<H> b, HalfPair<H> c) {
  // half-precision products are exact in float; the sum then rounds once to float, once to H (CUDA: once).
  return {H(std::fma(float(a.x), float(b.x), float(c.x))), H(std::fma(float(a.y), float(b.y), float(c.y)))};
}
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 v) { return {v, v}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __half2 __half2half2(__half v) { return {v, v}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
// MLX's element-wise functors on a half type: computed in float, rounded to the type (as MLX's are).
namespace mlx::core::cu {
struct Sigmoid {
  template <typename H> H operator()(H x) { return H(1.0f / (1.0f + std::exp(-float(x)))); }
};
struct Multiply {
  template <typename H> H operator()(H a, H b) { return H(float(a) * float(b)); }
};
}  // namespace mlx::core::cu

// mma.sync.m16n8k16.row.col, f32 sums, emulated for the 32 threads of a warp from PTX's fragment layout.
struct WarpTiles { unsigned a[32][4], b[32][2]; std::unique_ptr<std::barrier<>> meet; };
static WarpTiles warps_tiles[32];
template <typename Half>
float half_value(unsigned pair, int high) {
  Half h; const uint16_t bits = static_cast<uint16_t>(high ? pair >> 16 : pair & 0xFFFF);
  std::memcpy(&h, &bits, 2); return float(h);
}
template <typename Half>
void emulated_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  const int lane = threadIdx.x & 31;
  WarpTiles& tiles = warps_tiles[threadIdx.x >> 5];
  for (int i = 0; i < 4; ++i) tiles.a[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) tiles.b[lane][i] = b[i];
  tiles.meet->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {  // a_i: rows g (i even) / g + 8 (i odd), columns 2t, 2t + 1 (+ 8 for i >= 2)
      const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
      A[row][col] = half_value<Half>(tiles.a[l][i], 0);
      A[row][col + 1] = half_value<Half>(tiles.a[l][i], 1);
    }
    for (int i = 0; i < 2; ++i) {  // b_i: rows 2t, 2t + 1 (+ 8 for i = 1), column g
      B[2 * t + 8 * i][g] = half_value<Half>(tiles.b[l][i], 0);
      B[2 * t + 8 * i + 1][g] = half_value<Half>(tiles.b[l][i], 1);
    }
  }
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {  // d_i: row g (+ 8 for i >= 2), column 2t (+ 1 for odd i)
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double sum = 0;
    for (int kk = 0; kk < 16; ++kk) sum += static_cast<double>(A[row][kk]) * B[kk][col];
    d[i] += static_cast<float>(sum);
  }
  tiles.meet->arrive_and_wait();
}
// A warp's butterfly exchange: each lane leaves its value, takes its partner's.
static float shuffle_slots[32][32];
inline float __shfl_xor_sync(unsigned, float value, int mask) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  shuffle_slots[warp][lane] = value;
  warps_tiles[warp].meet->arrive_and_wait();
  const float partner = shuffle_slots[warp][lane ^ mask];
  warps_tiles[warp].meet->arrive_and_wait();
  return partner;
}
inline int __shfl_xor_sync(unsigned all, int value, int mask) {  // the same exchange, the int's bits carried
  float carried; std::memcpy(&carried, &value, 4);
  carried = __shfl_xor_sync(all, carried, mask);
  int out; std::memcpy(&out, &carried, 4); return out;
}
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
using std::cos;
using std::isnan;
using std::sin;
"""


def block_launcher(params: str, args: str, blocks: str, threads: int | str) -> str:
    """C++ of `extern "C" void run(params)`: `kernel(args)` on `blocks` blocks (a C++ expression, which may read the
    parameters) of `threads` threads, one block after another, each thread a std::thread with its threadIdx (the
    warps' meeting points and the block's barrier made for that many)."""
    return f"""
extern "C" void run({params}) {{
  const int block_count = {blocks}, block_threads = {threads};
  for (int warp = 0; warp < block_threads / 32; ++warp) warps_tiles[warp].meet = std::make_unique<std::barrier<>>(32);
  block_barrier = std::make_unique<std::barrier<>>(block_threads);
  blockDim.x = block_threads;
  gridDim.x = block_count;
  for (int block = 0; block < block_count; ++block) {{
    blockIdx.x = block;
    std::vector<std::thread> lanes;
    for (int i = 0; i < block_threads; ++i)
      lanes.emplace_back([=] {{
        threadIdx.x = i;
        kernel({args});
      }});
    for (auto& lane : lanes) lane.join();
  }}
}}
"""


def kernel_source(path: Path, name: str, switches: dict[str, bool] | None = None) -> str:
    """The CUDA source held by `constexpr const char* name = R"(...)";` in the C++ file `path`, compacted as the host
    code hands it to MLX (_core.compact_kernel_source, its `#if` switches resolved as given)."""
    from mlxrunner import _core

    found = re.search(rf'constexpr const char\* {name} = R"\((.*?)\)";', path.read_text(), re.S)
    assert found, f"{name} not in {path.name}"
    return _core.compact_kernel_source(found.group(1), switches or {})


def compile_library(tmp_path: Path, code: str) -> ctypes.CDLL:
    """`code` built as a shared library by the host's C++ compiler (the one that builds _core)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "kernel.cpp").write_text(code)
    compiler = shutil.which("c++") or shutil.which("g++")
    lib = tmp_path / "kernel.so"
    built = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
                            "-fno-strict-aliasing", str(tmp_path / "kernel.cpp"), "-o", str(lib)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    return ctypes.CDLL(str(lib))


NN = Path(__file__).resolve().parents[2] / "csrc" / "nn"
QK_ROPE_PARAMS = ("const T* qkv, const int* qkv_shape, const T* q_weight, const T* k_weight, "
                  "const float* inverse_frequencies, const int* offsets, const int* offsets_shape, T* q_out, T* k_out, "
                  "T* v_out")


def build_qk_rope(tmp_path: Path, constants: str, norm: bool) -> ctypes.CDLL:
    """The q/k kernel (csrc/nn/cuda_norm_rope.cpp, kQkRope) after the device function it calls (kCudaHeadNormRope) and
    `constants` (T, D, Q_HEADS, KV_HEADS, TRADITIONAL, EPS_BITS), as a library: run(blocks, qkv, qkv_shape, q_weight,
    k_weight, inverse_frequencies, offsets, offsets_shape, q_out, k_out, v_out), 4 warps a block (kQkHeadsABlock), a
    warp a query, key or value head."""
    body = kernel_source(NN / "cuda_norm_rope.cpp", "kQkRope", {"NORM": norm})
    code = (PRELUDE + kernel_source(NN / "cuda_norm_rope.h", "kCudaHeadNormRope") + constants +
            f"static void kernel({QK_ROPE_PARAMS}) {{\n{body}\n}}\n")
    args = ", ".join(param.split()[-1].lstrip("*") for param in QK_ROPE_PARAMS.split(", "))
    return compile_library(tmp_path, code + block_launcher(f"int blocks, {QK_ROPE_PARAMS}", args, "blocks", 4 * 32))


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values -> their bfloat16 bits, rounded to nearest even (as the emulated type rounds)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)
