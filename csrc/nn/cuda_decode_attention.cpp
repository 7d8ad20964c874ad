#include "nn/cuda_decode_attention.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"
#include "nn/cuda_norm_rope.h"

namespace mlxr {

namespace {

// One block a (key/value head, split of the keys), kWarps warps. The G query heads that share the key head are all
// scored here, so each key is read once. Lane l holds D / 32 consecutive elements of each query (scaled, in float),
// of each key and value it reads, and of its sums; warp w takes keys in runs of kUnroll (their loads issued together),
// every kWarps-th run of the split; each warp keeps an online softmax per query head, and the warps meet in shared
// memory. A split's part: its largest score, the sum of exp(score - that) and the weighted values, in float.
// The block of split 0, warp 0, writes the step's key and value into the cache (slot `position`); every block reads
// that position's key and value from k and v instead, so no block waits on the write. With MLXR_ROPE, q and k come
// as projected and each block makes their norms and RoPE itself (one launch a layer fewer than the q/k kernel first).
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
#if MLXR_ROPE
  // q and k as projected: the block's G query heads and its key head normed (MLXR_NORM) and rotated here, a warp a
  // head, as the q/k kernel makes them (norm_rope_head: the same bits), into shared memory, then read in this
  // kernel's layout. Each block of the key head makes the same key; split 0's writes it to the cache.
  __shared__ T roped[G + 1][D];
  for (int h = warp; h <= G; h += kWarps) {
    const bool is_key = h == G;
    const T* src = is_key ? k + kv_head * k_strides[1] : q + (kv_head * G + h) * q_strides[1];
    const long long stride = is_key ? k_strides[3] : q_strides[3];
#if MLXR_NORM
    mlxr_rope::norm_rope_head<T, D, TRADITIONAL, true>(src, stride, is_key ? k_weight : q_weight,
                                                       __int_as_float(EPS_BITS), inverse_frequencies, static_cast<float>(at),
                                                       roped[h]);
#else
    mlxr_rope::norm_rope_head<T, D, TRADITIONAL, false>(src, stride, nullptr, 0.f, inverse_frequencies,
                                                        static_cast<float>(at), roped[h]);
#endif
  }
  __syncthreads();
#endif
  float new_key[kPer], new_value[kPer], query[G][kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane * kPer + i;
#if MLXR_ROPE
    new_key[i] = static_cast<float>(roped[G][e]);
#pragma unroll
    for (int g = 0; g < G; ++g) query[g][i] = scale * static_cast<float>(roped[g][e]);
#else
    new_key[i] = static_cast<float>(k[kv_head * k_strides[1] + e * k_strides[3]]);
#pragma unroll
    for (int g = 0; g < G; ++g) query[g][i] = scale * static_cast<float>(q[(kv_head * G + g) * q_strides[1] + e * q_strides[3]]);
#endif
    new_value[i] = static_cast<float>(v[kv_head * v_strides[1] + e * v_strides[3]]);
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

// One block a row (a token's query head: the decode step's one token, or token t of a chunk, row t Q_HEADS + head),
// a thread an element: the splits' parts rescaled to the largest maximum and summed, stored as [tokens, Q_HEADS D].
// The splits' maxima and sums come through shared memory kStage at a time, each stage loaded by the block's threads
// together; each thread then sums its element's parts, eight loads issued at once. (A loop reading the parts
// straight from memory waited a round trip a split: 4.0 us a layer at the 8B's 10 splits, session 29's profile.) With
// one stage (64 splits or fewer: every decode step) the sums are those of a loop over all splits from the largest
// maximum; more stages rescale what the earlier ones summed to the later maxima, as an online softmax does.
constexpr const char* kDecodeAttentionMerge = R"(
  constexpr int kStage = 64;
  const int head = blockIdx.x, d = threadIdx.x;
  const int splits = part_max_shape[1];
  const float neg_inf = -__int_as_float(0x7f800000);
  __shared__ float stage_max[kStage], stage_sum[kStage];
  float top = neg_inf, total = 0.f, weighted = 0.f;
  for (int first = 0; first < splits; first += kStage) {
    const int count = min(kStage, splits - first);
    __syncthreads();  // every thread is done with the last stage
    for (int s = d; s < count; s += D) {
      stage_max[s] = part_max[head * splits + first + s];
      stage_sum[s] = part_sum[head * splits + first + s];
    }
    __syncthreads();
    float stage_top = top;
    for (int s = 0; s < count; ++s) stage_top = fmaxf(stage_top, stage_max[s]);
    if (stage_top == neg_inf) continue;  // no split so far saw a key (a chunk row's splits past its position)
    const float carried = top == neg_inf ? 0.f : expf(top - stage_top);
    total *= carried;
    weighted *= carried;
    const float* acc = part_acc + (static_cast<size_t>(head) * splits + first) * D + d;
#pragma unroll 8
    for (int s = 0; s < count; ++s) {
      const float rescale = expf(stage_max[s] - stage_top);
      total += rescale * stage_sum[s];
      weighted += rescale * acc[static_cast<size_t>(s) * D];
    }
    top = stage_top;
  }
  out[head * D + d] = static_cast<T>(weighted / total);
)";

// A chunk of several new tokens (a prompt's rest after the prompt cache, a chat's next turn) on tensor cores. One block
// a (key/value head, tile of 64 query rows, split of the keys), 4 warps of 16 query rows each; a key head's query rows
// are its G query heads at each of the chunk's tokens, row r = token r / G of head kv_head G + r % G, so that every
// key is read once for all the heads that share it. Keys and values come through shared memory 32 at a time in two
// stages (the next stage's copies in flight, cp.async, while the block computes on this one; the second product's
// pairs, along the keys, read by ldmatrix .trans); a warp computes its rows' scores with mma.sync m16n8k16 (q from
// registers, k from shared memory), keeps an online softmax in base 2 in the layout the mma gives it (lane: rows group
// and group + 8, key columns 2 quad, 2 quad + 1 of each 8), hands its probabilities to the second product as they lie
// (the score tile of 16 keys is the A tile of the next mma, rounded to T, as flash attention does) and sums p v in
// float. Token t sees positions up to offset + t. The chunk's own keys and values (positions offset ..) are read from k
// and v, never from the slots, which the key head's blocks write, a share each (nothing else reads them: the same
// argument as the decode step's). A split's part as the decode kernel's: the rows' largest score (natural units), the
// sum of exp(score - that) and the weighted values.
constexpr const char* kChunkAttentionHelpers = R"(
namespace mlxr_chunk {
// Two floats rounded to T, as the 32-bit register pair an mma operand takes.
__device__ __forceinline__ unsigned pair_bits(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&p);
}
__device__ __forceinline__ unsigned pair_bits(float lo, float hi, __half) {
  const __half2 p = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&p);
}
template <typename T>
__device__ __forceinline__ unsigned two_at(const T* p) {
  return *reinterpret_cast<const unsigned*>(p);
}
// 8 elements of a key and of a value, each read every `stride` elements, to 8 consecutive ones at key_to and value_to:
// every load before the first store (a load through a pointer that may alias a store before it cannot move above it,
// so loads and stores in turn would each wait a round trip).
template <typename T>
__device__ __forceinline__ void move8_pair(T* key_to, T* value_to, const T* key_from, long long key_stride,
                                           const T* value_from, long long value_stride) {
  T key8[8], value8[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    key8[i] = key_from[i * key_stride];
    value8[i] = value_from[i * value_stride];
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    key_to[i] = key8[i];
    value_to[i] = value8[i];
  }
}
// Whether 8 elements of T from p may move as one 16-byte word: consecutive (unit stride) and aligned.
template <typename T>
__device__ __forceinline__ bool whole_word(const T* p, long long stride) {
  return stride == 1 && (reinterpret_cast<unsigned long long>(p) & 15) == 0;
}
// Four 8 x 8 tiles of 2-byte elements from shared memory, transposed (ldmatrix .trans): lanes 8 m .. 8 m + 7 give the
// addresses of tile m's rows, 16 bytes each, and lane l receives, in register m, tile m's elements (2 (l % 4), l / 4)
// and (2 (l % 4) + 1, l / 4): an mma B operand whose pairs run down a column, read in one instruction where two
// 2-byte loads a register did.
__device__ __forceinline__ void load_tiles_transposed(unsigned (&r)[4], const void* row) {
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(at));
}
}  // namespace mlxr_chunk
)";

constexpr const char* kChunkAttentionParts = R"(
  using namespace mlxr_chunk;
  constexpr int kWarps = 4;
  constexpr int kRows = 16 * kWarps;
  constexpr int kKeys = 32;       // keys a stage
  constexpr int kSplitKeys = 64;  // a split's keys are a multiple of this (the host's kChunkKeys)
  constexpr int kPad = 8;
  constexpr int G = Q_HEADS / KV_HEADS;
  const float neg_inf = -__int_as_float(0x7f800000);
#if MLXR_ROPE
  // q, k and v as projected: the q|k|v product itself, [1, T, (Q_HEADS + 2 KV_HEADS) D], head h of token t at
  // t (Q_HEADS + 2 KV_HEADS) D + h D, q's heads first, then k's, then v's. Read in place, so that the host builds no
  // views of it (a reshape, three slices and three transposes a layer, each an array for MLX to build and evaluate).
  const int queries = qkv_shape[1];
  const T* q = qkv;
  const T* k = qkv + Q_HEADS * D;
  const T* v = qkv + (Q_HEADS + KV_HEADS) * D;
  const long long q_strides[4] = {0, D, (Q_HEADS + 2 * KV_HEADS) * D, 1};
  const long long (&k_strides)[4] = q_strides;
  const long long (&v_strides)[4] = q_strides;
#else
  const int queries = q_shape[2];
#endif
  const int rows = G * queries;
  const int query_tiles = (rows + kRows - 1) / kRows;
  const int splits = gridDim.x / (KV_HEADS * query_tiles);
  const int split = blockIdx.x % splits;
  const int query_tile = (blockIdx.x / splits) % query_tiles;
  const int kv_head = blockIdx.x / (splits * query_tiles);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, quad = lane & 3;
  const int capacity = keys_shape[2];
  const int offset = position[0];
  const int length = offset + queries;
  const int chunk = ((length + splits - 1) / splits + kSplitKeys - 1) / kSplitKeys * kSplitKeys;
  const int begin = split * chunk;
  const int last_row = min(rows, (query_tile + 1) * kRows) - 1;
  const int end = min(min(length, begin + chunk), offset + last_row / G + 1);
  const float scale = __int_as_float(SCALE_BITS) * 1.4426950408889634f;
  const size_t head_first = static_cast<size_t>(kv_head) * capacity * D;
#if MLXR_ROPE
  // q and k as projected: a head's row normed (MLXR_NORM) and rotated at its position by one warp, as the q/k kernel
  // makes it (norm_rope_head: the same bits), into dst.
  auto rope_head = [&](const T* src, long long stride, bool is_key, int at, T* dst) {
#if MLXR_NORM
    mlxr_rope::norm_rope_head<T, D, TRADITIONAL, true>(src, stride, is_key ? k_weight : q_weight,
                                                       __int_as_float(EPS_BITS), inverse_frequencies,
                                                       static_cast<float>(at), dst);
#else
    mlxr_rope::norm_rope_head<T, D, TRADITIONAL, false>(src, stride, nullptr, 0.f, inverse_frequencies,
                                                        static_cast<float>(at), dst);
#endif
  };
#endif
  {
    // The chunk's keys and values into their slots, 8 elements a thread, shared among the key head's blocks (one
    // block writing them all, element by element, waited a round trip per element: see move8_pair).
    T* key_slots = const_cast<T*>(keys);
    T* value_slots = const_cast<T*>(values);
    const int head_blocks = query_tiles * splits;
#if MLXR_ROPE
    // The keys normed and rotated, a warp a token, shared among the key head's blocks' warps; the values below.
    for (int t = (query_tile * splits + split) * kWarps + warp; t < queries; t += head_blocks * kWarps) {
      rope_head(k + kv_head * k_strides[1] + t * k_strides[2], k_strides[3], true, offset + t,
                key_slots + head_first + static_cast<size_t>(offset + t) * D);
    }
#endif
    for (int c = (query_tile * splits + split) * blockDim.x + threadIdx.x; c < queries * (D / 8);
         c += head_blocks * blockDim.x) {
      const int t = c / (D / 8), e = (c % (D / 8)) * 8;
      const T* value_from = v + kv_head * v_strides[1] + t * v_strides[2] + e * v_strides[3];
      T* value_to = value_slots + head_first + static_cast<size_t>(offset + t) * D + e;
#if MLXR_ROPE
      if (whole_word(value_from, v_strides[3])) {
        *reinterpret_cast<uint4*>(value_to) = *reinterpret_cast<const uint4*>(value_from);
      } else {
        T value8[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) value8[i] = value_from[i * v_strides[3]];
#pragma unroll
        for (int i = 0; i < 8; ++i) value_to[i] = value8[i];
      }
#else
      const T* key_from = k + kv_head * k_strides[1] + t * k_strides[2] + e * k_strides[3];
      T* key_to = key_slots + head_first + static_cast<size_t>(offset + t) * D + e;
      if (whole_word(key_from, k_strides[3]) && whole_word(value_from, v_strides[3])) {
        const uint4 key_word = *reinterpret_cast<const uint4*>(key_from);
        const uint4 value_word = *reinterpret_cast<const uint4*>(value_from);
        *reinterpret_cast<uint4*>(key_to) = key_word;
        *reinterpret_cast<uint4*>(value_to) = value_word;
      } else {
        move8_pair(key_to, value_to, key_from, k_strides[3], value_from, v_strides[3]);
      }
#endif
    }
  }
  // Two stages of kKeys keys and values in shared memory: the copies of the next stage fly while the block computes on
  // this one (a single stage made every block wait for each tile's copies before computing on it).
  __shared__ __align__(16) T key_tile[2][kKeys][D + kPad];
  __shared__ __align__(16) T value_tile[2][kKeys][D + kPad];
  // The kKeys keys and values from `tile` into `stage`: the cache's copied asynchronously (cp.async: every copy in
  // flight at once; plain loads then stores waited a round trip each, as the compiler cannot move a load through a
  // pointer that may be shared memory past a store to shared memory), lanes along a row; the chunk's own from k and v;
  // zeros past the last key any row of the block sees (a value is multiplied by its probability, 0 there, and must not
  // be a NaN). One group of copies a stage.
  auto load_stage = [&](int stage, int tile) {
    for (int c = threadIdx.x; c < kKeys * (D / 8); c += blockDim.x) {
      const int slot = c / (D / 8), e = (c % (D / 8)) * 8;
      const int j = tile + slot;
      if (j < offset) {
        const size_t at = head_first + static_cast<size_t>(j) * D + e;
        copy_16_async(&key_tile[stage][slot][e], keys + at);
        copy_16_async(&value_tile[stage][slot][e], values + at);
      } else if (j < end) {
        const int t = j - offset;
        const T* value_from = v + kv_head * v_strides[1] + t * v_strides[2] + e * v_strides[3];
#if MLXR_ROPE
        if (whole_word(value_from, v_strides[3])) {
          copy_16_async(&value_tile[stage][slot][e], value_from);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) value_tile[stage][slot][e + i] = value_from[i * v_strides[3]];
        }
#else
        const T* key_from = k + kv_head * k_strides[1] + t * k_strides[2] + e * k_strides[3];
        if (whole_word(key_from, k_strides[3]) && whole_word(value_from, v_strides[3])) {
          copy_16_async(&key_tile[stage][slot][e], key_from);
          copy_16_async(&value_tile[stage][slot][e], value_from);
        } else {
          move8_pair(&key_tile[stage][slot][e], &value_tile[stage][slot][e], key_from, k_strides[3], value_from, v_strides[3]);
        }
#endif
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) key_tile[stage][slot][e + i] = value_tile[stage][slot][e + i] = T(0.f);
      }
    }
#if MLXR_ROPE
    // The chunk's own keys of this stage normed and rotated from k, a warp a key (its readers wait at the barrier
    // after the copies, as for the copied keys).
    for (int slot = warp; slot < kKeys; slot += kWarps) {
      const int j = tile + slot;
      if (j < offset || j >= end) continue;
      rope_head(k + kv_head * k_strides[1] + (j - offset) * k_strides[2], k_strides[3], true, j, &key_tile[stage][slot][0]);
    }
#endif
    commit_async_copies();
  };
  float max_lo = neg_inf, max_hi = neg_inf, sum_lo = 0.f, sum_hi = 0.f;
  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  if (begin < end) load_stage(0, begin);  // in flight while the queries load
  const int row_lo = query_tile * kRows + warp * 16 + group, row_hi = row_lo + 8;
  const int seen_lo = offset + row_lo / G, seen_hi = offset + row_hi / G;
  auto query_at = [&](int row, int d) -> float {
    if (row >= rows) return 0.f;
    return static_cast<float>(q[(kv_head * G + row % G) * q_strides[1] + (row / G) * q_strides[2] + d * q_strides[3]]);
  };
  // The rows' pairs (d, d + 1) as the mma's A tile wants them: one 4-byte word each where a row's elements are
  // consecutive and the pairs aligned (the decoder's q, a view of the projection's rows), all 32 loads before the
  // first use; element by element otherwise. The word loads took a 64-token chunk's kernel from 37.5 to 33.0 us on an
  // H100 (benchmarks/gpu/chunk_kernel_probe.py): 64 two-byte loads and conversions had cost ~11,000 cycles a block.
  unsigned query[D / 16][4];
  const bool lo_in = row_lo < rows, hi_in = row_hi < rows;
  // The rows' pairs from lo's and hi's rows, one 4-byte word each (a row's elements consecutive, the pairs aligned).
  auto query_words = [&](const T* lo, const T* hi) {
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
      query[s][0] = lo_in ? two_at(lo + 16 * s) : 0u;
      query[s][1] = hi_in ? two_at(hi + 16 * s) : 0u;
      query[s][2] = lo_in ? two_at(lo + 16 * s + 8) : 0u;
      query[s][3] = hi_in ? two_at(hi + 16 * s + 8) : 0u;
    }
  };
#if MLXR_ROPE
  // The warp's 16 query rows normed and rotated into shared memory, D elements a row: stage 1's tiles, which no copy
  // fills before the loop's first round (after the second barrier here).
  T* roped_rows = (warp < 2 ? &key_tile[1][0][0] : &value_tile[1][0][0]) + (warp & 1) * 16 * D;
  for (int i = 0; i < 16; ++i) {
    const int row = query_tile * kRows + warp * 16 + i;
    if (row >= rows) break;
    rope_head(q + (kv_head * G + row % G) * q_strides[1] + (row / G) * q_strides[2], q_strides[3], false,
              offset + row / G, roped_rows + i * D);
  }
  __syncthreads();
  query_words(roped_rows + group * D + 2 * quad, roped_rows + (group + 8) * D + 2 * quad);
  __syncthreads();
#else
  const T* q_lo = q + (kv_head * G + row_lo % G) * q_strides[1] + (row_lo / G) * q_strides[2] + 2 * quad;
  const T* q_hi = q + (kv_head * G + row_hi % G) * q_strides[1] + (row_hi / G) * q_strides[2] + 2 * quad;
  const bool pairs_aligned = (reinterpret_cast<unsigned long long>(q) & 3) == 0 && ((q_strides[1] | q_strides[2]) & 1) == 0;
  if (q_strides[3] == 1 && pairs_aligned) {
    query_words(q_lo, q_hi);
  } else {
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
      const int d = 16 * s + 2 * quad;
      query[s][0] = pair_bits(query_at(row_lo, d), query_at(row_lo, d + 1), T{});
      query[s][1] = pair_bits(query_at(row_hi, d), query_at(row_hi, d + 1), T{});
      query[s][2] = pair_bits(query_at(row_lo, d + 8), query_at(row_lo, d + 9), T{});
      query[s][3] = pair_bits(query_at(row_hi, d + 8), query_at(row_hi, d + 9), T{});
    }
  }
#endif
  for (int tile = begin, stage = 0; tile < end; tile += kKeys, stage ^= 1) {
    // The next stage's copies start (into the buffer every warp finished with at the last barrier), then this one's
    // are waited for.
    if (tile + kKeys < end) {
      load_stage(stage ^ 1, tile + kKeys);
      wait_async_copies<1>();
    } else {
      wait_async_copies<0>();
    }
    __syncthreads();
    float score[kKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      score[n][0] = score[n][1] = score[n][2] = score[n][3] = 0.f;
#pragma unroll
      for (int s = 0; s < D / 16; ++s) {
        const unsigned b[2] = {two_at(&key_tile[stage][8 * n + group][16 * s + 2 * quad]),
                               two_at(&key_tile[stage][8 * n + group][16 * s + 8 + 2 * quad])};
        mma(score[n], query[s], b, T{});
      }
    }
    float top_lo = max_lo, top_hi = max_hi;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = tile + 8 * n + 2 * quad + (i & 1);
        const bool seen = j < end && j <= (i < 2 ? seen_lo : seen_hi);
        score[n][i] = seen ? score[n][i] * scale : neg_inf;
      }
      top_lo = fmaxf(top_lo, fmaxf(score[n][0], score[n][1]));
      top_hi = fmaxf(top_hi, fmaxf(score[n][2], score[n][3]));
    }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      top_lo = fmaxf(top_lo, __shfl_xor_sync(0xffffffffu, top_lo, o));
      top_hi = fmaxf(top_hi, __shfl_xor_sync(0xffffffffu, top_hi, o));
    }
    // A row that has seen no key yet keeps 0 as its reference, so that -inf - -inf never makes a NaN.
    const float ref_lo = top_lo == neg_inf ? 0.f : top_lo, ref_hi = top_hi == neg_inf ? 0.f : top_hi;
    const float rescale_lo = exp2f(max_lo - ref_lo), rescale_hi = exp2f(max_hi - ref_hi);
    max_lo = top_lo;
    max_hi = top_hi;
    float tile_sum_lo = 0.f, tile_sum_hi = 0.f;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      score[n][0] = exp2f(score[n][0] - ref_lo);
      score[n][1] = exp2f(score[n][1] - ref_lo);
      score[n][2] = exp2f(score[n][2] - ref_hi);
      score[n][3] = exp2f(score[n][3] - ref_hi);
      tile_sum_lo += score[n][0] + score[n][1];
      tile_sum_hi += score[n][2] + score[n][3];
    }
    sum_lo = sum_lo * rescale_lo + tile_sum_lo;
    sum_hi = sum_hi * rescale_hi + tile_sum_hi;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      acc[n][0] *= rescale_lo;
      acc[n][1] *= rescale_lo;
      acc[n][2] *= rescale_hi;
      acc[n][3] *= rescale_hi;
    }
#pragma unroll
    for (int s = 0; s < kKeys / 16; ++s) {
      const unsigned p[4] = {pair_bits(score[2 * s][0], score[2 * s][1], T{}),
                             pair_bits(score[2 * s][2], score[2 * s][3], T{}),
                             pair_bits(score[2 * s + 1][0], score[2 * s + 1][1], T{}),
                             pair_bits(score[2 * s + 1][2], score[2 * s + 1][3], T{})};
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        // B's pairs run along the keys: four 8 x 8 tiles, keys 16 s .. + 7 and + 8 .. + 15 of columns 8 n .. + 7 and
        // 8 n + 8 .. + 15, transposed (lane l gives the row of key 16 s + l % 16 at column 8 n + 8 (l / 16)).
        unsigned b[4];
        load_tiles_transposed(b, &value_tile[stage][16 * s + (lane & 15)][8 * n + 8 * (lane >> 4)]);
        const unsigned b_this[2] = {b[0], b[1]}, b_next[2] = {b[2], b[3]};
        mma(acc[n], p, b_this, T{});
        mma(acc[n + 1], p, b_next, T{});
      }
    }
    __syncthreads();  // every warp is done with this stage before the next round's copies overwrite it
  }
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, o);
    sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, o);
  }
  const float ln2 = 0.6931471805599453f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = half == 0 ? row_lo : row_hi;
    if (row >= rows) continue;
    const int part = ((row / G) * Q_HEADS + kv_head * G + row % G) * splits + split;
    const float top = half == 0 ? max_lo : max_hi;
    if (quad == 0) {
      part_max[part] = top == neg_inf ? neg_inf : top * ln2;
      part_sum[part] = half == 0 ? sum_lo : sum_hi;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      part_acc[static_cast<size_t>(part) * D + 8 * n + 2 * quad] = acc[n][2 * half];
      part_acc[static_cast<size_t>(part) * D + 8 * n + 2 * quad + 1] = acc[n][2 * half + 1];
    }
  }
)";

constexpr int kThreads = 128;          // kWarps in the source, 32 lanes each (both parts kernels)
constexpr int kKeysPerSplit = 16;      // at least: a run of kUnroll keys for each of the kWarps warps (the
                                       // measuring switch MLXRUNNER_DECODE_SPLIT_KEYS sets it; session 29)
constexpr int kMostSplits = 64;        // 8 key heads x 64: ~4 blocks an SM of an H100 at long contexts
constexpr int kChunkRows = 64;         // query rows a block of the chunk kernel (kRows)
constexpr int kChunkKeys = 64;         // a chunk kernel split's keys are a multiple of this (kSplitKeys)
constexpr int kChunkBlocks = 384;      // blocks the chunk kernel's splits aim at: three an SM of an H100 (132 SMs)
constexpr int kMostChunkTokens = 128;  // longer chunks (a prompt's prefill) take MLX's attention (cuDNN's)

// Splits of `length` keys into runs of equal size where each split gets at least one key. Fewer keys a split, more
// blocks: at 64 keys a split the 8B's ~150 keys made 8 key heads x 3 splits = 24 blocks, each warp a few dependent
// trips to memory, 13.5 us a layer against MLX's 8.2 (session 28's profile); at 16, 80 blocks took 8.0 us and the
// decode step ~4 % less time (session 29, H100). MLXRUNNER_DECODE_SPLIT_KEYS times others.
int splits_for(int length) {
  static EnvSwitch split_keys("MLXRUNNER_DECODE_SPLIT_KEYS", kKeysPerSplit);
  const int keys_per_split = static_cast<int>(std::max(1LL, split_keys.number()));
  const int wanted = std::clamp((length + keys_per_split - 1) / keys_per_split, 1, kMostSplits);
  const int chunk = (length + wanted - 1) / wanted;
  return (length + chunk - 1) / chunk;
}

// The chunk kernel's splits of `length` keys for `blocks_a_split` blocks each: enough for ~kChunkBlocks blocks
// (MLXRUNNER_CHUNK_BLOCKS=N, a measuring switch, sets N: benchmarks/gpu/chunk_attention_bench.py sweeps it), at most
// one a kChunkKeys keys.
int chunk_splits_for(int length, int blocks_a_split) {
  static EnvSwitch chunk_blocks("MLXRUNNER_CHUNK_BLOCKS", kChunkBlocks);
  const int blocks = static_cast<int>(std::max(1LL, chunk_blocks.number()));
  const int tiles = (length + kChunkKeys - 1) / kChunkKeys;
  const int wanted = std::clamp((blocks + blocks_a_split - 1) / blocks_a_split, 1, tiles);
  const int chunk = ((length + wanted - 1) / wanted + kChunkKeys - 1) / kChunkKeys * kChunkKeys;
  return (length + chunk - 1) / chunk;
}

// The heads every kernel here takes: D 64 or 128, query heads a multiple of the key heads, a half-precision dtype.
bool heads_fit(int q_heads, int kv_heads, int d, mx::Dtype dtype) {
  return (d == 64 || d == 128) && kv_heads > 0 && q_heads % kv_heads == 0 && half_precision(dtype);
}

// What both kernels take of q, k and v: one sequence on CUDA, its heads as heads_fit takes them, k and v alike.
bool cache_attention_shapes(const mx::array& q, const mx::array& k, const mx::array& v) {
  if (!running_on_cuda() || q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape()) return false;
  return q.shape(0) == 1 && k.shape(0) == 1 && k.shape(2) == q.shape(2) && k.shape(3) == q.shape(3) &&
         heads_fit(q.shape(1), k.shape(1), q.shape(3), q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
}

// A chunk's tokens the chunk kernel takes: 2 to kMostChunkTokens.
bool chunk_tokens_fit(int tokens) {
  return tokens >= 2 && tokens <= kMostChunkTokens;
}

// The cache's buffers [1, kv_heads, capacity >= length, D], row-contiguous, in dtype; the position one int32; length at
// least the new tokens.
void check_cache_buffers(int kv_heads, int d, mx::Dtype dtype, int tokens, const mx::array& keys,
                         const mx::array& values, const mx::array& position, int length) {
  if (keys.shape() != values.shape() || keys.ndim() != 4 || keys.shape(0) != 1 || keys.shape(1) != kv_heads ||
      keys.shape(3) != d || keys.shape(2) < length || length < tokens || keys.dtype() != dtype ||
      values.dtype() != dtype || position.size() != 1 || position.dtype() != mx::int32 ||
      !keys.flags().row_contiguous || !values.flags().row_contiguous) {
    throw std::invalid_argument("cache attention: the cache's buffers or the position do not fit the query");
  }
}

// The same for k's heads and tokens in q's dtype.
void check_cache_buffers(const mx::array& q, const mx::array& k, const mx::array& keys, const mx::array& values,
                         const mx::array& position, int length) {
  check_cache_buffers(k.shape(1), q.shape(3), q.dtype(), k.shape(2), keys, values, position, length);
}

using KernelArgs = std::vector<std::pair<std::string, mx::fast::TemplateArg>>;

// Both parts kernels' template arguments.
KernelArgs kernel_args(mx::Dtype dtype, int d, int q_heads, int kv_heads, float scale) {
  return {{"T", dtype}, {"D", d}, {"Q_HEADS", q_heads}, {"KV_HEADS", kv_heads}, {"SCALE_BITS", cuda_float_bits(scale)}};
}

// The same for q and k as heads [B, heads, T, D].
KernelArgs kernel_args(const mx::array& q, const mx::array& k, float scale) {
  return kernel_args(q.dtype(), q.shape(3), q.shape(1), k.shape(1), scale);
}

// What a roped variant (MLXR_ROPE: the kernel makes the q/k norms and RoPE) takes after the plain kernel's inputs and
// template arguments, in both parts kernels: RoPE's frequencies, then the q/k norms' weights where there are norms.
// Returns whether there are norms (then the MLXR_NORM variant is the one to launch).
bool add_rope(const DecodeRope& rope, std::vector<mx::array>& inputs, KernelArgs& args) {
  inputs.push_back(rope.rope.inverse_frequencies);
  args.emplace_back("TRADITIONAL", rope.rope.traditional);
  if (!rope.norms) return false;
  inputs.insert(inputs.end(), {rope.norms->q_weight, rope.norms->k_weight});
  args.emplace_back("EPS_BITS", cuda_float_bits(rope.norms->eps));
  return true;
}

// The splits' parts merged: [1, tokens, q_heads D], a row per (token, query head).
mx::array merged(const std::vector<mx::array>& parts, int tokens, int q_heads, int d, mx::Dtype dtype) {
  static const auto merge = cuda_kernel("mlxr_decode_attention_merge", {"part_acc", "part_max", "part_sum"}, {"out"},
                                        kDecodeAttentionMerge, "", true);
  return merge(parts, {{1, tokens, q_heads * d}}, {dtype},
               {cuda_checked_threads(static_cast<long long>(tokens) * q_heads * d), 1, 1}, {d, 1, 1},
               {{"T", dtype}, {"D", d}}, std::nullopt, false, {})[0];
}

// A parts kernel's splits over `blocks` blocks of kThreads (its part rows: token t's query head h at t q_heads + h),
// merged into [1, tokens, q_heads D] by the merge kernel after it.
mx::array attended(const mx::fast::CustomKernelFunction& kernel, const std::vector<mx::array>& inputs,
                   const KernelArgs& args, int tokens, int q_heads, int d, mx::Dtype dtype, int splits,
                   long long blocks) {
  const int rows = tokens * q_heads;
  auto split_parts =
      kernel(inputs, {{rows, splits, d}, {rows, splits}, {rows, splits}}, {mx::float32, mx::float32, mx::float32},
             {cuda_checked_threads(blocks * kThreads), 1, 1}, {kThreads, 1, 1}, args, std::nullopt, false, {});
  return merged(split_parts, tokens, q_heads, d, dtype);
}

}  // namespace

bool cuda_decode_attention_applies(const mx::array& q, const mx::array& k, const mx::array& v) {
  static EnvSwitch decode_attention("MLXRUNNER_DECODE_ATTENTION");
  return !decode_attention.off() && cache_attention_shapes(q, k, v) && q.shape(2) == 1 && q.shape(1) / k.shape(1) <= 8;
}

bool cuda_decode_attention_ropes(const mx::array& q, const DecodeRope& rope) {
  static EnvSwitch decode_rope("MLXRUNNER_DECODE_ROPE");
  return !decode_rope.off() && head_norm_rope_fits(q.shape(-1), q.dtype(), rope.rope, rope.norms);
}

mx::array cuda_decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys,
                                const mx::array& values, const mx::array& position, int length, float scale,
                                const std::optional<DecodeRope>& rope) {
  const int q_heads = q.shape(1), kv_heads = k.shape(1), d = q.shape(3);
  check_cache_buffers(q, k, keys, values, position, length);
  if (rope && !cuda_decode_attention_ropes(q, *rope)) {
    throw std::invalid_argument("cuda_decode_attention: the RoPE or the q/k norms do not fit the query");
  }
  const int splits = splits_for(length);
  auto args = kernel_args(q, k, scale);
  std::vector<mx::array> inputs{q, k, v, keys, values, position};
  static const auto parts = cuda_kernel("mlxr_decode_attention_parts", {"q", "k", "v", "keys", "values", "position"},
                                        {"part_acc", "part_max", "part_sum"}, kDecodeAttentionParts, "", false,
                                        {{"MLXR_ROPE", false}, {"MLXR_NORM", false}});
  // The variants that make the q/k norms (Qwen3, Gemma 3) and RoPE themselves from the projected heads.
  static const auto roped =
      cuda_kernel("mlxr_decode_attention_roped", {"q", "k", "v", "keys", "values", "position", "inverse_frequencies"},
                  {"part_acc", "part_max", "part_sum"}, kDecodeAttentionParts, kCudaHeadNormRope, false,
                  {{"MLXR_ROPE", true}, {"MLXR_NORM", false}});
  static const auto roped_normed =
      cuda_kernel("mlxr_decode_attention_roped_normed",
                  {"q", "k", "v", "keys", "values", "position", "inverse_frequencies", "q_weight", "k_weight"},
                  {"part_acc", "part_max", "part_sum"}, kDecodeAttentionParts, kCudaHeadNormRope, false,
                  {{"MLXR_ROPE", true}, {"MLXR_NORM", true}});
  const auto* kernel = &parts;
  if (rope) kernel = add_rope(*rope, inputs, args) ? &roped_normed : &roped;
  return attended(*kernel, inputs, args, 1, q_heads, d, q.dtype(), splits, static_cast<long long>(kv_heads) * splits);
}

bool cuda_chunk_attention_applies(const mx::array& q, const mx::array& k, const mx::array& v) {
  return cache_attention_shapes(q, k, v) && chunk_tokens_fit(q.shape(2));
}

bool chunk_attention_switched_on() {
  static EnvSwitch chunk_attention("MLXRUNNER_CHUNK_ATTENTION");
  return !chunk_attention.off();
}

namespace {

// The chunk kernel's parts over `length` keys for `tokens` query tokens, merged: [1, tokens, q_heads D].
mx::array chunk_attention(const mx::fast::CustomKernelFunction& kernel, const std::vector<mx::array>& inputs,
                          const KernelArgs& args, int q_heads, int kv_heads, int tokens, int d, mx::Dtype dtype,
                          int length) {
  const int query_tiles = (q_heads / kv_heads * tokens + kChunkRows - 1) / kChunkRows;
  const int splits = chunk_splits_for(length, kv_heads * query_tiles);
  return attended(kernel, inputs, args, tokens, q_heads, d, dtype, splits,
                  static_cast<long long>(kv_heads) * query_tiles * splits);
}

const std::string& chunk_header() {
  static const std::string header = std::string(kCudaMma) + kCudaAsyncCopies + kChunkAttentionHelpers;
  return header;
}

}  // namespace

bool cuda_chunk_attention_ropes(const mx::array& qkv, int q_heads, int kv_heads, const DecodeRope& rope) {
  static EnvSwitch chunk_rope("MLXRUNNER_CHUNK_ROPE");
  return !chunk_rope.off() && cuda_chunk_product_fits(qkv, q_heads, kv_heads, rope);
}

bool cuda_chunk_product_fits(const mx::array& qkv, int q_heads, int kv_heads, const DecodeRope& rope) {
  const int heads = q_heads + 2 * kv_heads;
  if (!running_on_cuda() || qkv.ndim() != 3 || qkv.shape(0) != 1 || heads <= 0 || qkv.shape(2) % heads != 0 ||
      !qkv.flags().row_contiguous) {
    return false;
  }
  const int d = qkv.shape(2) / heads;
  return heads_fit(q_heads, kv_heads, d, qkv.dtype()) && chunk_tokens_fit(qkv.shape(1)) &&
         head_norm_rope_fits(d, qkv.dtype(), rope.rope, rope.norms);
}

mx::array cuda_chunk_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys,
                               const mx::array& values, const mx::array& position, int length, float scale) {
  check_cache_buffers(q, k, keys, values, position, length);
  static const auto parts = cuda_kernel("mlxr_chunk_attention_parts", {"q", "k", "v", "keys", "values", "position"},
                                        {"part_acc", "part_max", "part_sum"}, kChunkAttentionParts, chunk_header(),
                                        false, {{"MLXR_ROPE", false}, {"MLXR_NORM", false}});
  return chunk_attention(parts, {q, k, v, keys, values, position}, kernel_args(q, k, scale), q.shape(1), k.shape(1),
                         q.shape(2), q.shape(3), q.dtype(), length);
}

mx::array cuda_chunk_attention_from_product(const mx::array& qkv, int q_heads, int kv_heads, const mx::array& keys,
                                            const mx::array& values, const mx::array& position, int length, float scale,
                                            const DecodeRope& rope) {
  if (!cuda_chunk_product_fits(qkv, q_heads, kv_heads, rope)) {
    throw std::invalid_argument(
        "cuda_chunk_attention_from_product: the product, its RoPE or its q/k norms do not fit "
        "the kernel");
  }
  const int tokens = qkv.shape(1), d = qkv.shape(2) / (q_heads + 2 * kv_heads);
  check_cache_buffers(kv_heads, d, qkv.dtype(), tokens, keys, values, position, length);
  // The variants that make the q/k norms (Qwen3, Gemma 3) and RoPE themselves, reading the heads from the product.
  static const std::string roped_header = chunk_header() + kCudaHeadNormRope;
  static const auto roped =
      cuda_kernel("mlxr_chunk_attention_roped", {"qkv", "keys", "values", "position", "inverse_frequencies"},
                  {"part_acc", "part_max", "part_sum"}, kChunkAttentionParts, roped_header, false,
                  {{"MLXR_ROPE", true}, {"MLXR_NORM", false}});
  static const auto roped_normed =
      cuda_kernel("mlxr_chunk_attention_roped_normed",
                  {"qkv", "keys", "values", "position", "inverse_frequencies", "q_weight", "k_weight"},
                  {"part_acc", "part_max", "part_sum"}, kChunkAttentionParts, roped_header, false,
                  {{"MLXR_ROPE", true}, {"MLXR_NORM", true}});
  std::vector<mx::array> inputs{qkv, keys, values, position};
  auto args = kernel_args(qkv.dtype(), d, q_heads, kv_heads, scale);
  const auto* kernel = add_rope(rope, inputs, args) ? &roped_normed : &roped;
  return chunk_attention(*kernel, inputs, args, q_heads, kv_heads, tokens, d, qkv.dtype(), length);
}

}  // namespace mlxr
