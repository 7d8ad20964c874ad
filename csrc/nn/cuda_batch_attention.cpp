#include "nn/cuda_batch_attention.h"

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// One block a (row, query head), kWarps warps. Lane l holds D / 32 consecutive elements of the query (scaled, in
// float), of each key and of the output; warp w takes keys w, w + kWarps, ...: a key's score is the warp's sum of the
// lanes' products, and each warp keeps its own running maximum, sum of exponentials and weighted values (the online
// softmax). The warps then meet in shared memory, their parts rescaled to the largest maximum. Everything is float;
// the output is rounded to T once. (MLX's one-query kernel does the same arithmetic in another order.)
constexpr const char* kBatchAttentionSource = R"(
  constexpr int kWarps = 4;
  constexpr int kPer = D / 32;
  const float neg_inf = -__int_as_float(0x7f800000);
  const int row = blockIdx.x / Q_HEADS, head = blockIdx.x % Q_HEADS;
  const int kv_head = head / (Q_HEADS / KV_HEADS);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int capacity = keys_shape[2];
  const int length = positions[row] + 1;
  const float scale = __int_as_float(SCALE_BITS);
  float query[kPer];
  const T* q_row = q + (static_cast<size_t>(row) * Q_HEADS + head) * D + lane * kPer;
#pragma unroll
  for (int i = 0; i < kPer; ++i) query[i] = scale * static_cast<float>(q_row[i]);
  const size_t first = (static_cast<size_t>(row) * KV_HEADS + kv_head) * capacity * D + lane * kPer;
  float running_max = neg_inf, sum = 0.f, acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  for (int j = warp; j < length; j += kWarps) {
    const T* key = keys + first + static_cast<size_t>(j) * D;
    float score = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) score += query[i] * static_cast<float>(key[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) score += __shfl_xor_sync(0xffffffffu, score, o);
    const float new_max = fmaxf(running_max, score);
    const float rescale = expf(running_max - new_max), weight = expf(score - new_max);
    sum = sum * rescale + weight;
    const T* value = values + first + static_cast<size_t>(j) * D;
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = acc[i] * rescale + weight * static_cast<float>(value[i]);
    running_max = new_max;
  }
  __shared__ float warp_max[kWarps], warp_sum[kWarps], warp_acc[kWarps][D];
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum[warp] = sum;
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) warp_acc[warp][lane * kPer + i] = acc[i];
  __syncthreads();
  for (int e = threadIdx.x; e < D; e += 32 * kWarps) {
    float top = neg_inf;
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, warp_max[w]);
    float total = 0.f, weighted = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      if (warp_max[w] == neg_inf) continue;  // a warp that saw no key (a row shorter than kWarps)
      const float rescale = expf(warp_max[w] - top);
      total += rescale * warp_sum[w];
      weighted += rescale * warp_acc[w][e];
    }
    out[(static_cast<size_t>(row) * Q_HEADS + head) * D + e] = static_cast<T>(weighted / total);
  }
)";

constexpr int kThreads = 128;  // kWarps in the source, 32 lanes each

}  // namespace

// On unless MLXRUNNER_BATCH_ATTENTION=0: on the H200 (session 14, benchmarks/README.md) 16 concurrent 4B streams
// went from 1,303 to 1,592 tok/s with it, batched greedy text equal to each request's alone.
bool batch_attention_switched_on() {
  static EnvSwitch batch_attention("MLXRUNNER_BATCH_ATTENTION");
  return !batch_attention.off();
}

std::optional<mx::array> cuda_batch_decode_attention(const mx::array& q, const mx::array& keys, const mx::array& values,
                                                     const mx::array& positions, float scale) {
  if (!running_on_cuda() || q.ndim() != 4 || keys.ndim() != 4 || values.shape() != keys.shape()) return std::nullopt;
  const int rows = q.shape(0), q_heads = q.shape(1), d = q.shape(3), kv_heads = keys.shape(1);
  const bool fits = q.shape(2) == 1 && (d == 64 || d == 128) && keys.shape(0) == rows && keys.shape(3) == d &&
                    kv_heads > 0 && q_heads % kv_heads == 0 && half_precision(q.dtype()) && keys.dtype() == q.dtype() &&
                    values.dtype() == q.dtype() && positions.size() == rows && positions.dtype() == mx::int32;
  if (!fits) return std::nullopt;
  static const auto kernel =
      cuda_kernel("mlxr_batch_decode_attention", {"q", "keys", "values", "positions"}, {"out"}, kBatchAttentionSource);
  auto out = kernel({q, keys, values, positions}, {{rows, 1, q_heads * d}}, {q.dtype()},
                    {cuda_checked_threads(static_cast<long long>(rows) * q_heads * kThreads), 1, 1}, {kThreads, 1, 1},
                    {{"T", q.dtype()},
                     {"D", d},
                     {"Q_HEADS", q_heads},
                     {"KV_HEADS", kv_heads},
                     {"SCALE_BITS", cuda_float_bits(scale)}},
                    std::nullopt, false, {});
  return out[0];
}

}  // namespace mlxr
