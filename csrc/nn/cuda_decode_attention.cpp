#include "nn/cuda_decode_attention.h"

#include <algorithm>
#include <stdexcept>

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// One block a (key/value head, split of the keys), kWarps warps. The G query heads that share the key head are all
// scored here, so each key is read once. Lane l holds D / 32 consecutive elements of each query (scaled, in float),
// of each key and value it reads, and of its sums; warp w takes keys in runs of kUnroll (their loads issued together),
// every kWarps-th run of the split; each warp keeps an online softmax per query head, and the warps meet in shared
// memory. A split's part: its largest score, the sum of exp(score - that) and the weighted values, in float.
// The block of split 0, warp 0, writes the step's key and value into the cache (slot `position`); every block reads
// that position's key and value from k and v instead, so no block waits on the write.
constexpr const char* kDecodeAttentionParts = R"(
  constexpr int kWarps = 4;
  constexpr int kUnroll = 4;
  constexpr int kPer = D / 32;
  constexpr int G = Q_HEADS / KV_HEADS;
  const float neg_inf = -__int_as_float(0x7f800000);
  const int splits = gridDim.x / KV_HEADS;
  const int kv_head = blockIdx.x / splits, split = blockIdx.x % splits;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int capacity = keys_shape[2];
  const int at = position[0];
  const int length = at + 1;
  const int chunk = (length + splits - 1) / splits;
  const int begin = split * chunk, end = min(length, begin + chunk);
  const float scale = __int_as_float(SCALE_BITS);
  float new_key[kPer], new_value[kPer], query[G][kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane * kPer + i;
    new_key[i] = static_cast<float>(k[kv_head * k_strides[1] + e * k_strides[3]]);
    new_value[i] = static_cast<float>(v[kv_head * v_strides[1] + e * v_strides[3]]);
#pragma unroll
    for (int g = 0; g < G; ++g) query[g][i] = scale * static_cast<float>(q[(kv_head * G + g) * q_strides[1] + e * q_strides[3]]);
  }
  const size_t head_first = static_cast<size_t>(kv_head) * capacity * D + lane * kPer;
  if (split == 0 && warp == 0) {
    T* key_slots = const_cast<T*>(keys);
    T* value_slots = const_cast<T*>(values);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      key_slots[head_first + static_cast<size_t>(at) * D + i] = static_cast<T>(new_key[i]);
      value_slots[head_first + static_cast<size_t>(at) * D + i] = static_cast<T>(new_value[i]);
    }
  }
  float running_max[G], sum[G], acc[G][kPer];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    running_max[g] = neg_inf;
    sum[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[g][i] = 0.f;
  }
  for (int first = begin + warp * kUnroll; first < end; first += kWarps * kUnroll) {
    float key[kUnroll][kPer], value[kUnroll][kPer];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = first + u;
      const size_t slot = head_first + static_cast<size_t>(j) * D;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        key[u][i] = j >= end ? 0.f : j == at ? new_key[i] : static_cast<float>(keys[slot + i]);
        value[u][i] = j >= end ? 0.f : j == at ? new_value[i] : static_cast<float>(values[slot + i]);
      }
    }
    // The run's scores for every query head: their warp sums as independent shuffle chains, then one online-softmax
    // update a head for the whole run (one rescale, where a key at a time chained an update per key).
    float score[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float partial = 0.f;
#pragma unroll
        for (int i = 0; i < kPer; ++i) partial += query[g][i] * key[u][i];
        score[u][g] = partial;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int g = 0; g < G; ++g) score[u][g] += __shfl_xor_sync(0xffffffffu, score[u][g], o);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float top = running_max[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (first + u < end) top = fmaxf(top, score[u][g]);
      }
      const float rescale = expf(running_max[g] - top);  // 0 at the first run (running_max -inf, top finite)
      float weight[kUnroll];
      float run_sum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        weight[u] = first + u < end ? expf(score[u][g] - top) : 0.f;
        run_sum += weight[u];
      }
      sum[g] = sum[g] * rescale + run_sum;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        float weighted = 0.f;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) weighted += weight[u] * value[u][i];
        acc[g][i] = acc[g][i] * rescale + weighted;
      }
      running_max[g] = top;
    }
  }
  __shared__ float warp_max[kWarps][G], warp_sum[kWarps][G], warp_acc[kWarps][G][D];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      warp_max[warp][g] = running_max[g];
      warp_sum[warp][g] = sum[g];
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) warp_acc[warp][g][lane * kPer + i] = acc[g][i];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * D; e += 32 * kWarps) {
    const int g = e / D, d = e % D;
    float top = neg_inf;
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, warp_max[w][g]);
    float total = 0.f, weighted = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      if (warp_max[w][g] == neg_inf) continue;  // a warp that saw no key of this split
      const float rescale = expf(warp_max[w][g] - top);
      total += rescale * warp_sum[w][g];
      weighted += rescale * warp_acc[w][g][d];
    }
    const int part = (kv_head * G + g) * splits + split;
    part_acc[static_cast<size_t>(part) * D + d] = weighted;
    if (d == 0) {
      part_max[part] = top;
      part_sum[part] = total;
    }
  }
)";

// One block a query head, a thread an element: the splits' parts rescaled to the largest maximum and summed.
constexpr const char* kDecodeAttentionMerge = R"(
  const int head = blockIdx.x, d = threadIdx.x;
  const int splits = part_max_shape[1];
  const float neg_inf = -__int_as_float(0x7f800000);
  float top = neg_inf;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, part_max[head * splits + s]);
  float total = 0.f, weighted = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float rescale = expf(part_max[head * splits + s] - top);
    total += rescale * part_sum[head * splits + s];
    weighted += rescale * part_acc[static_cast<size_t>(head * splits + s) * D + d];
  }
  out[head * D + d] = static_cast<T>(weighted / total);
)";

constexpr int kThreads = 128;        // kWarps in the source, 32 lanes each
constexpr int kKeysPerSplit = 64;    // at least, so that a split's warps each have a run or more of keys
constexpr int kMostSplits = 64;      // 8 key heads x 64: ~4 blocks an SM of an H100 at long contexts

// Splits of `length` keys into runs of equal size where each split gets at least one key.
int splits_for(int length) {
  const int wanted = std::clamp((length + kKeysPerSplit - 1) / kKeysPerSplit, 1, kMostSplits);
  const int chunk = (length + wanted - 1) / wanted;
  return (length + chunk - 1) / chunk;
}

}  // namespace

bool cuda_decode_attention_applies(const mx::array& q, const mx::array& k, const mx::array& v) {
  static const bool off = switched_off("MLXRUNNER_DECODE_ATTENTION");
  if (off || !running_on_cuda() || q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape()) return false;
  const int q_heads = q.shape(1), kv_heads = k.shape(1), d = q.shape(3);
  return q.shape(0) == 1 && q.shape(2) == 1 && k.shape(0) == 1 && k.shape(2) == 1 && k.shape(3) == d &&
         (d == 64 || d == 128) && kv_heads > 0 && q_heads % kv_heads == 0 && q_heads / kv_heads <= 8 &&
         half_precision(q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
}

mx::array cuda_decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys,
                                const mx::array& values, const mx::array& position, int length, float scale) {
  const int q_heads = q.shape(1), kv_heads = k.shape(1), d = q.shape(3);
  if (keys.shape() != values.shape() || keys.ndim() != 4 || keys.shape(1) != kv_heads || keys.shape(3) != d ||
      keys.shape(2) < length || keys.dtype() != q.dtype() || values.dtype() != q.dtype() || position.size() != 1 ||
      position.dtype() != mx::int32) {
    throw std::invalid_argument("decode attention: the cache's buffers or the position do not fit the query");
  }
  static const auto parts = cuda_kernel("mlxr_decode_attention_parts", {"q", "k", "v", "keys", "values", "position"},
                                        {"part_acc", "part_max", "part_sum"}, kDecodeAttentionParts, "", false);
  static const auto merge = cuda_kernel("mlxr_decode_attention_merge", {"part_acc", "part_max", "part_sum"}, {"out"},
                                        kDecodeAttentionMerge, "", true);
  const int splits = splits_for(length);
  const std::vector<std::pair<std::string, mx::fast::TemplateArg>> args{
      {"T", q.dtype()}, {"D", d}, {"Q_HEADS", q_heads}, {"KV_HEADS", kv_heads}, {"SCALE_BITS", cuda_float_bits(scale)}};
  auto split_parts = parts({q, k, v, keys, values, position}, {{q_heads, splits, d}, {q_heads, splits}, {q_heads, splits}},
                           {mx::float32, mx::float32, mx::float32},
                           {cuda_checked_threads(static_cast<long long>(kv_heads) * splits * kThreads), 1, 1},
                           {kThreads, 1, 1}, args, std::nullopt, false, {});
  auto out = merge(split_parts, {{1, 1, q_heads * d}}, {q.dtype()}, {q_heads * d, 1, 1}, {d, 1, 1},
                   {{"T", q.dtype()}, {"D", d}}, std::nullopt, false, {});
  return out[0];
}

}  // namespace mlxr
