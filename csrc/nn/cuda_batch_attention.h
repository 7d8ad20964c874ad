// A batch decode step's attention on CUDA: one query a sequence, each sequence seeing its own keys only.
//
// Concurrent requests decode together (text/batch.cpp) with caches of different lengths, right-padded in one buffer:
// a row must not see the slots past its own position. MLX 0.32's fused attention kernels take no array mask (its
// one-query kernel takes none at all), so such a step ran MLX's unfused attention: a product for the scores, the
// mask, a softmax and a product with the values (that one through cuBLAS), on every layer. This kernel reads each
// row's keys up to its position straight from the cache's buffers and writes the heads merged, [B, 1, q_heads D], as
// the output projection reads them: one operation a layer. The decoder takes it unless MLXRUNNER_BATCH_ATTENTION=0
// (batch_attention_switched_on), a measuring switch, until a GPU has timed it against MLX's.
#pragma once

#include <optional>

#include "nn/weights.h"

namespace mlxr {

// softmax(q k^T scale) v for q [B, q_heads, 1, D] against keys and values [B, kv_heads, capacity, D] (a batch
// cache's buffers), row b seeing slots 0..positions[b] (int32 [B]); q_heads a multiple of kv_heads (grouped
// queries), D 64 or 128, one half-precision dtype. Returns [B, 1, q_heads D]; nullopt off CUDA or outside those
// cases: the caller runs MLX's attention with the mask.
std::optional<mx::array> cuda_batch_decode_attention(const mx::array& q, const mx::array& keys, const mx::array& values,
                                                     const mx::array& positions, float scale);

// Whether the decoder's batch steps use the kernel above: yes unless MLXRUNNER_BATCH_ATTENTION=0.
bool batch_attention_switched_on();

}  // namespace mlxr
