#include "nn/cuda_argmax.h"

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// One block a row. Each thread keeps its best (value, index) over the row's 16-byte words it reads (kRound words a
// round, every load of a round before its first comparison), then the warps' and the block's bests meet. `better`
// is mx::argmax's rule (numpy's too): a NaN is larger than any number, and among equals (NaNs included) the smaller
// index wins. Elements before the row's first 16-byte boundary and after its last whole word are read one by one.
constexpr const char* kArgmax = R"(
  constexpr int kRound = 8;
  constexpr int kPerWord = 16 / sizeof(T);
  const int n = z_shape[z_ndim - 1];
  const T* row = z + static_cast<size_t>(blockIdx.x) * n;
  float best = -__int_as_float(0x7f800000);
  int index = n;
  auto better = [](float value, int at, float best_value, int best_at) {
    if (isnan(best_value)) return isnan(value) && at < best_at;
    if (isnan(value)) return true;
    return best_value < value || (best_value == value && at < best_at);
  };
  auto offer = [&](float value, int at) {
    if (better(value, at, best, index)) {
      best = value;
      index = at;
    }
  };
  const int misaligned = static_cast<int>((reinterpret_cast<unsigned long long>(row) & 15) / sizeof(T));
  const int head = min(n, misaligned == 0 ? 0 : kPerWord - misaligned);
  for (int i = threadIdx.x; i < head; i += blockDim.x) offer(static_cast<float>(row[i]), i);
  const int words = (n - head) / kPerWord;
  const uint4* word_row = reinterpret_cast<const uint4*>(row + head);
  for (int first = threadIdx.x; first < words; first += kRound * blockDim.x) {
    uint4 held[kRound];
#pragma unroll
    for (int r = 0; r < kRound; ++r) {
      const int w = first + r * blockDim.x;
      if (w < words) held[r] = word_row[w];
    }
#pragma unroll
    for (int r = 0; r < kRound; ++r) {
      const int w = first + r * blockDim.x;
      if (w >= words) break;
      const T* values = reinterpret_cast<const T*>(&held[r]);
#pragma unroll
      for (int e = 0; e < kPerWord; ++e) offer(static_cast<float>(values[e]), head + w * kPerWord + e);
    }
  }
  for (int i = head + words * kPerWord + threadIdx.x; i < n; i += blockDim.x) offer(static_cast<float>(row[i]), i);
  auto meet_in_warp = [&] {  // every lane ends with its warp's best
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best, o);
      const int other_at = __shfl_xor_sync(0xffffffffu, index, o);
      offer(other, other_at);
    }
  };
  meet_in_warp();
  __shared__ float warp_best[32];
  __shared__ int warp_index[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_index[warp] = index;
  }
  __syncthreads();
  if (warp == 0) {
    best = -__int_as_float(0x7f800000);
    index = n;
    if (lane < blockDim.x / 32) {
      best = warp_best[lane];
      index = warp_index[lane];
    }
    meet_in_warp();
    if (lane == 0) out[blockIdx.x] = index >= n ? 0 : index;
  }
)";

constexpr int kArgmaxThreads = 1024;

}  // namespace

std::optional<mx::array> cuda_argmax(const mx::array& z) {
  static EnvSwitch cuda_argmax_switch("MLXRUNNER_CUDA_ARGMAX");
  if (cuda_argmax_switch.off() || !running_on_cuda() || (z.ndim() != 1 && z.ndim() != 2) ||
      !cuda_float_dtype(z.dtype()) || z.size() == 0 || z.shape(-1) > std::numeric_limits<int>::max() / 2) {
    return std::nullopt;
  }
  static const auto kernel = cuda_kernel("mlxr_argmax", {"z"}, {"out"}, kArgmax, "", /*ensure_row_contiguous=*/true);
  const int rows = z.ndim() == 1 ? 1 : z.shape(0);
  const mx::Shape shape = z.ndim() == 1 ? mx::Shape{} : mx::Shape{rows};
  return kernel({z}, {shape}, {mx::int32}, {cuda_checked_threads(static_cast<long long>(rows) * kArgmaxThreads), 1, 1},
                {kArgmaxThreads, 1, 1}, {{"T", z.dtype()}}, std::nullopt, false, {})[0];
}

}  // namespace mlxr
