// What the fused CUDA kernels (nn/cuda_norm_rope, nn/cuda_dit_fusion) share: CUDA snippets compiled into their
// sources (a block-wide sum, row loads and stores), and the host-side checks and launch shapes of row kernels.
#pragma once

#include <bit>
#include <limits>
#include <optional>
#include <stdexcept>
#include <tuple>

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

// Row kernels: one block per row of n, thread k holding elements k, k + blockDim.x, ... (PER_THREAD of them) in
// registers, every load before any store (a store may alias a later load, so the compiler cannot move loads above
// it: a kernel that stored as it went was latency-bound, 14 us for a 4,096-wide row on an H200).
inline constexpr const char* kCudaRowHelpers = R"(
// Loads this thread's elements of a row of n into v (0 past its end); returns their sum of squares.
template <int PER_THREAD, typename In>
__device__ inline float load_row(const In* row, int n, float (&v)[PER_THREAD]) {
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    v[k] = j < n ? static_cast<float>(row[j]) : 0.f;
    squares += v[k] * v[k];
  }
  return squares;
}

// MLX's rms_norm of a held row: weight * (the row times the normalizer, rounded to T), in T; held as floats (exact).
template <int PER_THREAD, typename T>
__device__ inline void norm_row(float (&out)[PER_THREAD], const float (&v)[PER_THREAD], int n, float normalizer,
                                const T* weight) {
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    out[k] = j < n ? static_cast<float>(weight[j] * static_cast<T>(v[k] * normalizer)) : 0.f;
  }
}

// The same times a scale, in T, stored.
template <int PER_THREAD, typename T>
__device__ inline void store_scaled_norm(T* out, const float (&v)[PER_THREAD], int n, float normalizer,
                                         const T* weight, const T* scale) {
  float normed[PER_THREAD];
  norm_row(normed, v, n, normalizer, weight);
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < n) out[j] = static_cast<T>(normed[k]) * scale[j];
  }
}

// A residual, h = x + gate * term (the product and the sum in T, as MLX's multiply and add round them), for this
// thread's elements: stored, and held in v (0 past the row's end). term holds T values as floats; the gate is read
// every gate_step elements (a range of a wider modulation output).
template <int PER_THREAD, typename T>
__device__ inline void store_residual(T* h, float (&v)[PER_THREAD], const T* x, const T* gate, long long gate_step,
                                      const float (&term)[PER_THREAD], int n) {
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    v[k] = 0.f;
    if (j < n) {
      const T sum = x[j] + gate[j * gate_step] * static_cast<T>(term[k]);
      h[j] = sum;
      v[k] = static_cast<float>(sum);
    }
  }
}
)";

inline constexpr int kCudaMaxPerThread = 32;  // elements a thread of a row kernel holds in registers

inline bool cuda_float_dtype(mx::Dtype dtype) {
  return dtype == mx::float32 || dtype == mx::bfloat16 || dtype == mx::float16;
}

// A float as the int of its bits (template arguments are ints).
inline int cuda_eps_bits(float eps) {
  return std::bit_cast<int>(eps);
}

inline int cuda_checked_threads(long long threads) {
  if (threads > std::numeric_limits<int>::max()) throw std::invalid_argument("fused kernel: tensor too large");
  return static_cast<int>(threads);
}

// A row kernel's launch: one block per row, 256 threads for rows up to 8,192 wide (hidden sizes of up to 8B-class
// models), 1,024 beyond, each thread holding per_thread elements (the kernels' PER_THREAD); nullopt where a row would
// need more than kCudaMaxPerThread elements a thread (over 32,768).
struct CudaRowLaunch {
  int per_thread;
  std::tuple<int, int, int> grid, block;
};

inline std::optional<CudaRowLaunch> cuda_row_launch(long long rows, int n) {
  const int threads = n <= 256 * kCudaMaxPerThread ? 256 : 1024;
  const int per_thread = (n + threads - 1) / threads;
  if (per_thread > kCudaMaxPerThread) return std::nullopt;
  return CudaRowLaunch{
      .per_thread = per_thread, .grid = {cuda_checked_threads(rows * threads), 1, 1}, .block = {threads, 1, 1}};
}

}  // namespace mlxr
