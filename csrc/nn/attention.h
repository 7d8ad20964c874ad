// Multi-head scaled dot-product attention, shared by every network.
//
// Layouts: projections come out as [B, L, heads * D]; split_heads() views them as [B, L, heads, D]
// (where per-head norms and RoPE apply), heads_first() as [B, heads, L, D] (what attention takes),
// and merge_heads() turns attention's [B, heads, L, D] output back into [B, L, heads * D].
#pragma once

#include <optional>

#include "nn/linear.h"
#include "nn/weights.h"

namespace mlxr {

// The query, key, value and output projections of a diffusers Attention module, [dim, dim] each,
// under the names it saves them with: to_q, to_k, to_v, to_out.0.
struct AttentionProjections {
  Linear to_q, to_k, to_v, to_out;

  static AttentionProjections load(const Weights& w, int dim, bool with_bias);
};

// [B, L, heads * D] -> [B, L, heads, D].
mx::array split_heads(const mx::array& x, int heads);

// [B, L, heads, D] -> [B, heads, L, D] (a transposed view).
mx::array heads_first(const mx::array& x);

// [B, heads, L, D] -> [B, L, heads * D].
mx::array merge_heads(const mx::array& x);

// The attention scale: `scale` if given, else 1 / sqrt(head_dim).
float scale_or_default(std::optional<float> scale, int head_dim);
// The same for q [..., D]: head_dim D.
float scale_or_default(std::optional<float> scale, const mx::array& q);

// softmax(q k^T * scale) v over q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (Hq a multiple of Hkv: MLX
// broadcasts the key/value heads over their query groups). `mask`, broadcast to [B, Hq, Lq, Lk], is
// either boolean (true = the query attends to that key) or additive (added to the scores). The scale
// is 1 / sqrt(D) unless given (Gemma's query_pre_attn_scalar). `sinks` [Hq] are attention sinks (GPT-OSS):
// per head, one more logit in the softmax's denominator that attends to nothing, so a query may give
// less than all of its attention to the keys.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v,
                    const std::optional<mx::array>& mask = std::nullopt, std::optional<float> scale = std::nullopt,
                    const std::optional<mx::array>& sinks = std::nullopt);

// attention() over bands of queries, so that at most about `max_scores` scores (queries x keys, per head) exist at
// once. Where MLX has no fused kernel (the CPU; heads wider than 128 on CUDA, such as a VAE's one head of 512
// channels) attention holds the whole [Lq, Lk] score matrix and its softmax: at a VAE's 16,384 pixels (a 1024^2
// image) 2 x 1 GiB in float32. A mask with a row per query is cut with the queries. Each band is evaluated before
// the next is built (so not for use under mx::compile).
mx::array attention_in_query_bands(const mx::array& q, const mx::array& k, const mx::array& v, size_t max_scores,
                                   const std::optional<mx::array>& mask = std::nullopt);

// The same, each query attending to its own and earlier positions only. Queries are the last Lq
// of the Lk positions (a prefill chunk after a cache): query i sees keys up to Lk - Lq + i.
mx::array causal_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           std::optional<float> scale = std::nullopt,
                           const std::optional<mx::array>& sinks = std::nullopt);

// Sliding-window attention: causal, and a query sees only the `window` positions ending at its own
// (itself and window - 1 before it), as transformers' sliding_window. The keys are in temporal order
// with the queries their last Lq, except that a lone query with at most `window` keys sees them all,
// in any order (a rotating cache's decode step: text/kv_cache.h).
mx::array windowed_causal_attention(const mx::array& q, const mx::array& k, const mx::array& v, int window,
                                    std::optional<float> scale = std::nullopt,
                                    const std::optional<mx::array>& sinks = std::nullopt);

// Boolean [Lq, Lk]: which keys each query sees under a causal sliding window, the queries being the
// last Lq of Lk positions in order.
mx::array sliding_window_mask(int queries, int keys, int window);

// Masks from a [B, T] attention mask (nonzero = a token, 0 = padding):
// padding keys get no attention: boolean [B, 1, 1, T];
mx::array padding_key_mask(const mx::array& attention_mask);
// the same combined with causal attention: boolean [B, 1, T, T].
mx::array causal_padding_key_mask(const mx::array& attention_mask);

}  // namespace mlxr
