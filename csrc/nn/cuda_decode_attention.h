// One sequence's attention over its cache on CUDA, writing the new keys and values into the cache in place: a decode
// step's (one token), and a short chunk's (a prompt's rest after the prompt cache, a chat's next turn: 2 to 128
// tokens).
//
// MLX arrays are immutable: a cache update is a slice_update, which writes in place only into a buffer nothing else
// holds. While decoding, the generator dispatches step n + 1 before step n has run (text/generate.cpp), and MLX keeps
// every input of step n alive until its GPU work completes, so most of step n + 1's updates found the cache's buffer
// still held and copied all of it first: an 8B profile (H100, 1,280-slot buffers) ran ~48 whole-buffer copies a token
// beside its two small writes a layer. This kernel takes the cache's buffers as inputs and writes position `position`
// itself: safe because nothing reads that slot before this step (the previous step saw positions below it) and the
// kernel's own blocks take the step's key and value from k and v, never from the slot. It then computes softmax(q k^T
// scale) v over positions 0..position, split over the keys so that a short context still fills the GPU (MLX's
// one-query kernel gives each query head one block up to 1,024 keys, 32 past that), and a second kernel merges the
// splits. A layer's decode attention is then two operations where it was five (two updates, two slices, the attention).
//
// A chunk of T tokens is the same in shape: its T keys and values written in place, then causal attention of its
// queries over positions 0 .. offset + T - 1, on tensor cores (a block a key head's 64 query rows and a split of the
// keys; MLX's attention is cuDNN's, whose blocks each take one query head's 64 rows and every key: 32 blocks for a
// 64-token chunk of a Qwen3-4B, on a GPU of 132 SMs), the splits merged by the same second kernel. A chunk's
// attention is then two operations where it was eight (two updates, two slices, the attention, the heads' transpose,
// reshape and the copy the output projection needs).
//
// The caller (Decoder::attention) takes the decode path only for a cache that may be written in place
// (KVCache::writes_in_place: no copy of it shares its buffers); a chunk also takes a cache whose buffers a copy shares,
// after MLX has written the chunk into a copy of them (KVCache::append_buffers). MLXRUNNER_DECODE_ATTENTION=0 turns the
// decode kernel off, MLXRUNNER_CHUNK_ATTENTION=0 the chunk kernel (chunk_attention_switched_on).
#pragma once

#include <optional>

#include "nn/cuda_norm_rope.h"
#include "nn/weights.h"

namespace mlxr {

// Whether the kernels below take these q [1, q_heads, 1, D], k and v [1, kv_heads, 1, D] (any strides): CUDA, D 64
// or 128, q_heads a multiple of kv_heads (at most 8 queries a key head), one half-precision dtype; and the switch on.
bool cuda_decode_attention_applies(const mx::array& q, const mx::array& k, const mx::array& v);

// The q/k norms (absent for Llama) and RoPE that the decode kernel can make itself from q and k as projected, one
// launch a layer fewer than the q/k kernel (cuda_qkv_heads) before it, the same bits.
struct DecodeRope {
  FusedRope rope;
  std::optional<QkNorms> norms;
};
// Whether the decode kernel makes them for this q: head_norm_rope_fits (nn/cuda_norm_rope.h) takes its heads with this
// RoPE and these norms; unless MLXRUNNER_DECODE_ROPE=0.
bool cuda_decode_attention_ropes(const mx::array& q, const DecodeRope& rope);

// Writes k and v at slot `position` (int32 [1], on the device: its value is length - 1) of keys and values [1,
// kv_heads, capacity, D] (row-contiguous buffers, capacity >= length), in place, and returns the attention of q over
// slots 0..length - 1 as [1, 1, q_heads D], the heads merged as the output projection reads them. `length` is the
// host's copy of position + 1 (it sets how the keys are split). With `rope`, q and k are the heads as projected, and
// the kernel makes their norms and RoPE at `position` (cuda_decode_attention_ropes must hold) before the cache gets k.
mx::array cuda_decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys,
                                const mx::array& values, const mx::array& position, int length, float scale,
                                const std::optional<DecodeRope>& rope = std::nullopt);

// Whether the chunk kernel takes these q [1, q_heads, T, D], k and v [1, kv_heads, T, D] (any strides): CUDA, 2 <= T
// <= 128, D 64 or 128, q_heads a multiple of kv_heads, one half-precision dtype.
bool cuda_chunk_attention_applies(const mx::array& q, const mx::array& k, const mx::array& v);
// Whether the decoder takes the chunk kernel: unless MLXRUNNER_CHUNK_ATTENTION=0. On an H100 (session 26) its sixth
// version took 30-32 us for a 64-token chunk over 3,064 keys where cuDNN's took 42-50, and the prompt cache's
// follow-up 7.2 ms where MLX's slice updates and cuDNN took 7.5-7.8.
bool chunk_attention_switched_on();

// Whether the chunk kernel takes this chunk straight from its q|k|v product [1, T, (q_heads + 2 kv_heads) D]
// (row-contiguous, 2 <= T <= 128, the heads as cuda_chunk_attention_applies takes them) and makes the q/k norms and
// RoPE itself (head_norm_rope_fits), unless MLXRUNNER_CHUNK_ROPE=0. It takes one operation a layer from the host, the
// q/k kernel's, and builds no views of the product: on an H100 (session 39, the prompt cache's follow-up, each round
// paired with one without it in the same process) 0.87 ms less a follow-up, faster in 26 of 30 rounds.
bool cuda_chunk_attention_ropes(const mx::array& qkv, int q_heads, int kv_heads, const DecodeRope& rope);
// The same but for the switch: what cuda_chunk_attention_from_product takes.
bool cuda_chunk_product_fits(const mx::array& qkv, int q_heads, int kv_heads, const DecodeRope& rope);

// Writes k and v at slots position[0] .. position[0] + T - 1 of keys and values [1, kv_heads, capacity, D]
// (row-contiguous, capacity >= length), in place, and returns the causal attention of q (token t at position[0] + t)
// over slots 0 .. length - 1 as [1, T, q_heads D]. `length` is the host's copy of position[0] + T.
mx::array cuda_chunk_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys,
                               const mx::array& values, const mx::array& position, int length, float scale);

// The same from the q|k|v product as projected (cuda_chunk_attention_ropes): each block reads its heads from the
// product in place and makes the q/k norms and RoPE (token t at position[0] + t) itself, the q/k kernel's bits, before
// the cache gets k. The step's kernel takes its q, k and v as views of the product instead: its q|k|v product form
// (MLXRUNNER_DECODE_PRODUCT, session 39) timed no faster on an H100 (session 40, best rounds: 250.6 against 241.4 tok/s
// at 4B, within that machine's drift) and was removed, as were both kernels' merging their own splits, the last block
// of a group doing the merge kernel's work, counted by tickets (MLXRUNNER_CHUNK_MERGE: +5.0 ms a prompt-cache
// follow-up; MLXRUNNER_DECODE_MERGE: 209.4 tok/s against the product form's 250.6; benchmarks/README.md, Session 40).
mx::array cuda_chunk_attention_from_product(const mx::array& qkv, int q_heads, int kv_heads, const mx::array& keys,
                                            const mx::array& values, const mx::array& position, int length, float scale,
                                            const DecodeRope& rope);

}  // namespace mlxr
