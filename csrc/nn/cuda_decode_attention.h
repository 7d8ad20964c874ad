// One sequence's decode step attention on CUDA, writing the step's key and value into the cache in place.
//
// MLX arrays are immutable: a cache update is a slice_update, which writes in place only into a buffer nothing else
// holds. While decoding, the generator dispatches step n + 1 before step n has run (text/generate.cpp), and MLX keeps
// every input of step n alive until its GPU work completes, so most of step n + 1's updates found the cache's buffer
// still held and copied all of it first: an 8B profile (H100, 1,280-slot buffers) ran ~48 whole-buffer copies a token
// beside its two small writes a layer. This kernel takes the cache's buffers as inputs and writes position `position`
// itself: safe because nothing reads that slot before this step (the previous step saw positions below it) and the
// kernel's own blocks take the step's key and value from k and v, never from the slot. It then computes softmax(q k^T
// scale) v over positions 0..position, split over the keys so that a short context still fills the GPU (MLX's one-query
// kernel gives each query head one block up to 1,024 keys, 32 past that), and a second kernel merges the splits. A layer's decode attention is then two
// operations where it was five (two updates, two slices, the attention).
//
// The caller (Decoder::attention) takes this path only for a cache that may be written in place
// (KVCache::writes_in_place: no copy of it shares its buffers); MLXRUNNER_DECODE_ATTENTION=0 turns it off.
#pragma once

#include <optional>

#include "nn/weights.h"

namespace mlxr {

// Whether the kernels below take these q [1, q_heads, 1, D], k and v [1, kv_heads, 1, D] (any strides): CUDA, D 64
// or 128, q_heads a multiple of kv_heads (at most 8 queries a key head), one half-precision dtype; and the switch on.
bool cuda_decode_attention_applies(const mx::array& q, const mx::array& k, const mx::array& v);

// Writes k and v at slot `position` (int32 [1], on the device: its value is length - 1) of keys and values [1,
// kv_heads, capacity, D] (row-contiguous buffers, capacity >= length), in place, and returns the attention of q over
// slots 0..length - 1 as [1, 1, q_heads D], the heads merged as the output projection reads them. `length` is the
// host's copy of position + 1 (it sets how the keys are split).
mx::array cuda_decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys,
                                const mx::array& values, const mx::array& position, int length, float scale);

}  // namespace mlxr
