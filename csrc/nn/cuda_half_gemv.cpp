#include "nn/cuda_half_gemv.h"

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"
#include "nn/slicing.h"

namespace mlxr {

namespace {

// A 16-byte chunk of a row (eight half-precision values), loaded whole where the row is 16-byte aligned (a weight's
// rows are when K is a multiple of 8 and the buffer is), element by element otherwise; and its products with a chunk
// of x added to a float sum, in order.
constexpr const char* kHalfGemvHelpers = R"(
template <typename T>
struct alignas(16) Chunk {
  T e[8];
};

template <typename T>
__device__ inline Chunk<T> load_chunk(const T* row, int c) {
  if (reinterpret_cast<unsigned long long>(row) % 16 == 0) return reinterpret_cast<const Chunk<T>*>(row)[c];
  Chunk<T> out;
#pragma unroll
  for (int e = 0; e < 8; ++e) out.e[e] = row[8 * c + e];
  return out;
}

template <typename T>
__device__ inline void accumulate(float& sum, const Chunk<T>& w, const Chunk<T>& x) {
#pragma unroll
  for (int e = 0; e < 8; ++e) sum += static_cast<float>(w.e[e]) * static_cast<float>(x.e[e]);
}
)";

// A warp a weight row n; lane l takes the row's chunks l, l + 32, ..., four at a time, every load of the four (and of
// the same chunks of every row of x: ROWS of them, from L1/L2, x is a few KB) before any arithmetic, so that each lane
// has 64 bytes of weight in flight and no x load waits behind the weight's; then multiplies. The lanes' sums meet by
// shuffles; lane 0 writes out[r][n]. A warp past the last row leaves whole, before the shuffles.
constexpr const char* kHalfGemvSource = R"(
  constexpr int kInFlight = 4;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int N = w_shape[0], K = w_shape[1];
  if (n >= N) return;
  const int chunks = K / 8;
  const T* row = w + static_cast<long long>(n) * K;
  float sum[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) sum[r] = 0.f;
  int c = lane;
  for (; c + 32 * (kInFlight - 1) < chunks; c += 32 * kInFlight) {
    Chunk<T> loaded[kInFlight];
    Chunk<T> xs[kInFlight][ROWS];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      loaded[u] = load_chunk(row, c + 32 * u);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) xs[u][r] = load_chunk(x + r * K, c + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) accumulate(sum[r], loaded[u], xs[u][r]);
    }
  }
  for (; c < chunks; c += 32) {
    const Chunk<T> loaded = load_chunk(row, c);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) accumulate(sum[r], loaded, load_chunk(x + r * K, c));
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    for (int offset = 16; offset > 0; offset >>= 1) sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) out[static_cast<long long>(r) * N + n] = static_cast<T>(sum[r]);
  }
)";

constexpr int kWarpsPerBlock = 8;

}  // namespace

bool half_gemv_switched_on() {
  static const bool on = switched_on("MLXRUNNER_HALF_GEMV");
  return on;
}

std::optional<mx::array> cuda_half_gemv(const mx::array& x, const mx::array& w) {
  if (!running_on_cuda() || !half_precision(x.dtype()) || w.dtype() != x.dtype() || w.ndim() != 2 || x.ndim() < 1 ||
      x.shape(-1) != w.shape(1) || w.shape(1) % 8 != 0 || x.size() == 0) {
    return std::nullopt;
  }
  const int rows = static_cast<int>(rows_of(x));
  if (rows > kMaxHalfGemvRows) return std::nullopt;
  static auto kernel = cuda_kernel("mlxr_half_gemv", {"x", "w"}, {"out"}, kHalfGemvSource, kHalfGemvHelpers,
                                   /*ensure_row_contiguous=*/true);
  const int n = w.shape(0);
  const int blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return kernel({x, w}, {output_shape(x, n)}, {x.dtype()},
                {cuda_checked_threads(static_cast<long long>(blocks) * 32 * kWarpsPerBlock), 1, 1},
                {32 * kWarpsPerBlock, 1, 1}, {{"T", x.dtype()}, {"ROWS", rows}}, std::nullopt, false, {})[0];
}

}  // namespace mlxr
