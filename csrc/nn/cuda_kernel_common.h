// What the fused CUDA kernels (nn/cuda_norm_rope, nn/cuda_dit_fusion) share: CUDA snippets compiled into their
// sources (a block-wide sum, row loads and stores), and the host-side checks and launch shapes of row kernels.
#pragma once

#include <bit>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>

#include "mlx/fast.h"
#include "nn/weights.h"

namespace mlxr {

// The sum of a float every thread of a block holds, given to every thread. blockDim.x a multiple of 32, at most
// 1,024; every thread of the block calls it. It may be called more than once in a kernel: the second barrier keeps a
// later call from overwriting the warp sums before every thread has read them.
inline constexpr const char* kCudaBlockSum = R"(
__device__ inline float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}
)";

// Row kernels: one block per row of n (a multiple of VEC), thread t holding the row's elements in vectors of VEC
// consecutive ones (one 16-byte load: 8 half-precision or 4 float32 elements): its vector q is elements
// VEC (t + q blockDim.x) .. + VEC - 1, its held slot k element held_index<VEC>(k); PER_THREAD slots in registers.
// Every row a kernel reads is loaded before its first reduction, and every load comes before any store (a store may
// alias a later load, so the compiler cannot move loads above it): the bytes in flight are what bounds these
// kernels. Measured on an H200 at a 1024^2 Z-Image's 4,128 x 3,840 bf16 rows: element by element 0.9-1.4 TB/s;
// 8-byte quads, the residual's x loaded after the norm's reduction, 1.0-1.6 TB/s (the gated residual + next norm
// 122 us for its 127 MB).
inline constexpr const char* kCudaRowHelpers = R"(
template <int VEC>
__device__ inline int held_index(int k) {
  return VEC * (threadIdx.x + (k / VEC) * blockDim.x) + (k % VEC);
}

template <typename T, int VEC>
struct alignas(VEC * sizeof(T)) Vec {
  T e[VEC];
};

// Elements j .. j + VEC - 1 of p (j a multiple of VEC); element by element where p is not aligned to a vector.
template <int VEC, typename T>
__device__ inline Vec<T, VEC> load_vec(const T* p, int j) {
  if (reinterpret_cast<unsigned long long>(p) % sizeof(Vec<T, VEC>) == 0) {
    return reinterpret_cast<const Vec<T, VEC>*>(p + j)[0];
  }
  Vec<T, VEC> q;
#pragma unroll
  for (int e = 0; e < VEC; ++e) q.e[e] = p[j + e];
  return q;
}

template <int VEC, typename T>
__device__ inline void store_vec(T* p, int j, const Vec<T, VEC>& q) {
  if (reinterpret_cast<unsigned long long>(p) % sizeof(Vec<T, VEC>) == 0) {
    reinterpret_cast<Vec<T, VEC>*>(p + j)[0] = q;
    return;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) p[j + e] = q.e[e];
}

// Loads this thread's elements of a row of n into v (0 past its end); returns their sum of squares.
template <int VEC, int PER_THREAD, typename In>
__device__ inline float load_row(const In* row, int n, float (&v)[PER_THREAD]) {
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; k += VEC) {
    const int j = held_index<VEC>(k);
    const Vec<In, VEC> q = j < n ? load_vec<VEC>(row, j) : Vec<In, VEC>{};
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      v[k + e] = j < n ? static_cast<float>(q.e[e]) : 0.f;
      squares += v[k + e] * v[k + e];
    }
  }
  return squares;
}

// This thread's elements of a vector of n (a weight, or a per-sample vector read every `step` elements), in T.
template <int VEC, int PER_THREAD, typename T>
__device__ inline void load_row_vector(T (&out)[PER_THREAD], const T* vector, long long step, int n) {
#pragma unroll
  for (int k = 0; k < PER_THREAD; k += VEC) {
    const int j = held_index<VEC>(k);
    if (j >= n) continue;
    if (step == 1) {
      const Vec<T, VEC> q = load_vec<VEC>(vector, j);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[k + e] = q.e[e];
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[k + e] = vector[(j + e) * step];
    }
  }
}

// MLX's rms_norm of a held row: weight * (the row times the normalizer, rounded to T), in T; held as floats (exact).
template <int VEC, int PER_THREAD, typename T>
__device__ inline void norm_row(float (&out)[PER_THREAD], const float (&v)[PER_THREAD], int n, float normalizer,
                                const T (&w)[PER_THREAD]) {
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    out[k] = held_index<VEC>(k) < n ? static_cast<float>(w[k] * static_cast<T>(v[k] * normalizer)) : 0.f;
  }
}

// Stores this thread's held values to a row of n.
template <int VEC, int PER_THREAD, typename T>
__device__ inline void store_held_row(T* row, const T (&v)[PER_THREAD], int n) {
#pragma unroll
  for (int k = 0; k < PER_THREAD; k += VEC) {
    const int j = held_index<VEC>(k);
    if (j >= n) continue;
    Vec<T, VEC> q;
#pragma unroll
    for (int e = 0; e < VEC; ++e) q.e[e] = v[k + e];
    store_vec<VEC>(row, j, q);
  }
}

// The norm times a scale (weight and scale loaded by the caller), in T, stored.
template <int VEC, int PER_THREAD, typename T>
__device__ inline void store_scaled_norm(T* out, const float (&v)[PER_THREAD], int n, float normalizer,
                                         const T (&weight)[PER_THREAD], const T (&scale)[PER_THREAD]) {
  float normed[PER_THREAD];
  norm_row<VEC>(normed, v, n, normalizer, weight);
  T scaled[PER_THREAD];
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) scaled[k] = static_cast<T>(normed[k]) * scale[k];
  store_held_row<VEC>(out, scaled, n);
}

// A residual, h = x + gate * term (the product and the sum in T, as MLX's multiply and add round them), for this
// thread's elements, x and the gate already loaded: stored, and held in v (0 past the row's end). term holds T values
// as floats. Returns the sum of squares of h.
template <int VEC, int PER_THREAD, typename T>
__device__ inline float store_residual(T* h, float (&v)[PER_THREAD], const float (&x)[PER_THREAD],
                                       const T (&gate)[PER_THREAD], const float (&term)[PER_THREAD], int n) {
  T sum[PER_THREAD];
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    sum[k] = static_cast<T>(x[k]) + gate[k] * static_cast<T>(term[k]);
    v[k] = held_index<VEC>(k) < n ? static_cast<float>(sum[k]) : 0.f;
    squares += v[k] * v[k];
  }
  store_held_row<VEC>(h, sum, n);
  return squares;
}
)";

inline constexpr int kCudaMaxPerThread = 32;  // elements a thread of a row kernel holds in registers

// The dtypes our row kernels take: float32 and the half-precision types.
inline bool cuda_float_dtype(mx::Dtype dtype) {
  return dtype == mx::float32 || half_precision(dtype);
}

// Whether the environment variable `name` is "0": the switches that turn a fused kernel off, to measure what it
// gains (MLXRUNNER_DIT_FUSION, MLXRUNNER_QKV_HEADS, MLXRUNNER_BATCH_ATTENTION). Callers read it once, into a static.
inline bool switched_off(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "0") == 0;
}

// Whether it is "1": the measuring switches that turn a way not yet proven on a GPU on (MLXRUNNER_HALF_MATVEC,
// MLXRUNNER_KERNEL_SOURCES_BY_PATH: both measured slower on the H200 in session 14). Read once, into a static, too.
inline bool switched_on(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// A float as the int of its bits (template arguments are ints).
inline int cuda_float_bits(float value) {
  return std::bit_cast<int>(value);
}

inline int cuda_checked_threads(long long threads) {
  if (threads > std::numeric_limits<int>::max()) throw std::invalid_argument("fused kernel: tensor too large");
  return static_cast<int>(threads);
}

// A row kernel's launch: one block per row, 256 threads for rows up to 8,192 wide (hidden sizes of up to 8B-class
// models), 1,024 beyond, each thread holding per_thread elements (the kernels' PER_THREAD) in whole vectors of
// `vector` elements (the kCudaRowHelpers kernels' VEC, which need n a multiple of it); nullopt where a row would
// need more than kCudaMaxPerThread elements a thread (over 32,768).
struct CudaRowLaunch {
  int per_thread;
  int vector;
  std::tuple<int, int, int> grid, block;
};

inline std::optional<CudaRowLaunch> cuda_row_launch(long long rows, int n, int vector = 1) {
  if (vector < 1 || n % vector != 0) return std::nullopt;
  const int threads = n <= 256 * kCudaMaxPerThread ? 256 : 1024;
  const int per_thread = (n + threads * vector - 1) / (threads * vector) * vector;
  if (per_thread > kCudaMaxPerThread) return std::nullopt;
  return CudaRowLaunch{.per_thread = per_thread,
                       .vector = vector,
                       .grid = {cuda_checked_threads(rows * threads), 1, 1},
                       .block = {threads, 1, 1}};
}

// The widest vector a row kernel can load its rows of n elements of `dtype` in: 16 bytes (8 half-precision or 4
// float32 elements) where n is a multiple of that, else 4 elements.
inline int cuda_row_vector(mx::Dtype dtype, int n) {
  const int widest = 16 / static_cast<int>(mx::size_of(dtype));
  return n % widest == 0 ? widest : 4;
}

// A kernel's source (or header) as MLX is handed it: without comments, indentation or blank lines, and with every
// `#if NAME` ... [`#else` ...] `#endif` whose NAME is in `switches` resolved to the branch it selects (other
// preprocessor lines are kept). MLX 0.32 rebuilds a custom kernel's whole source at every call and hashes it to name
// the compiled module: ~4 us of host time per 10 KB on the H200 machine, where a 4-bit decode step launches ~140 of
// our kernels; the commented source of the decode product, all its variants included, was 16 KB.
std::string compact_kernel_source(std::string_view source, const std::map<std::string, bool>& switches = {});

// What MLX is handed in place of a kernel source that is written to a file of its own: the one line that #includes
// it by its absolute path, after a mention of each of `inputs`' shape, strides and ndim that the source uses (MLX
// passes those only where the source it is given names them). The file, named by the source's hash, goes to a
// directory this process made for itself (mode 0700, removed at exit). MLX then rebuilds and hashes a few hundred bytes
// at each call instead of the whole source; whether MLX's NVRTC takes the include, and what it saves, is for
// benchmarks/gpu/op_cost.py to measure, so this is behind MLXRUNNER_KERNEL_SOURCES_BY_PATH=1 (off unless set).
std::string kernel_source_included(const std::string& source, const std::vector<std::string>& inputs = {});

// mx::fast::cuda_kernel with its source and header compacted (compact_kernel_source, the same switches for both), and
// both #included from files under MLXRUNNER_KERNEL_SOURCES_BY_PATH=1 (kernel_source_included).
mx::fast::CustomKernelFunction cuda_kernel(const std::string& name, const std::vector<std::string>& inputs,
                                           const std::vector<std::string>& outputs, std::string_view source,
                                           std::string_view header = "", bool ensure_row_contiguous = true,
                                           const std::map<std::string, bool>& switches = {});

}  // namespace mlxr
