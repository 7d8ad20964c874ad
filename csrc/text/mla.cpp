#include "text/mla.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <utility>

#include "nn/attention.h"
#include "nn/slicing.h"

namespace mlxr {

namespace {

// The low-rank norms use RMSNorm's default eps, not rms_norm_eps: DeepSeek's code and transformers
// build them without one.
constexpr float kLatentNormEps = 1e-6f;

// The per-head key and value rows over the latent as float: the absorbed products multiply them from
// either side, which a packed weight cannot do. They are small (20 heads x 448 x 512 for GLM).
mx::array float_weight(const Matrix& m) {
  if (!m.quantized) return m.weight;
  const auto& q = *m.quantized;
  if (!q.global_scale) return mx::dequantize(m.weight, q.scales, q.biases, q.spec.group_size, q.spec.bits, q.spec.mode);
  // nvfp4's tensor scale: float32 rows, as a scaled value is seldom a bfloat16 one (Embedding does the same).
  auto w = mx::dequantize(m.weight, q.scales, q.biases, q.spec.group_size, q.spec.bits, q.spec.mode, std::nullopt,
                          mx::float32);
  return mx::multiply(w, *q.global_scale);
}

// k_up [H, nope, rank] and v_up [H, v, rank] from either spelling: transformers' kv_b_proj
// [H * (nope + v), rank] (each head's key rows, then its value rows), or mlx-lm's embed_q [H, rank, nope]
// and unembed_out [H, v, rank] (the same split, saved by mlx_lm.convert).
std::pair<mx::array, mx::array> up_projections(const Weights& w, int heads, int rank, int nope, int v) {
  if (w.has("embed_q.weight")) {
    auto k_up = mx::swapaxes(float_weight(w.stacked_matrix("embed_q.weight", {heads}, rank, nope)), -1, -2);
    return {k_up, float_weight(w.stacked_matrix("unembed_out.weight", {heads}, v, rank))};
  }
  auto kv_b = float_weight(w.matrix("kv_b_proj.weight", heads * (nope + v), rank));
  auto per_head = mx::reshape(kv_b, {heads, nope + v, rank});
  return {mx::slice(per_head, {0, 0, 0}, {heads, nope, rank}),
          mx::slice(per_head, {0, nope, 0}, {heads, nope + v, rank})};
}

// Additive scores of the rope parts, with the mask applied: where a query may not attend, -inf.
mx::array masked_scores(const mx::array& scores, const std::optional<mx::array>& mask) {
  if (!mask) return scores;
  return mx::where(*mask, scores, mx::array(-std::numeric_limits<float>::infinity(), scores.dtype()));
}

// Causal mask for T queries that are the last T of `keys` positions: [T, keys], true = may attend.
mx::array causal_mask(int t, int keys) {
  auto q = mx::arange(keys - t, keys, mx::int32);
  auto k = mx::arange(keys, mx::int32);
  return mx::greater_equal(mx::expand_dims(q, 1), mx::expand_dims(k, 0));
}

}  // namespace

void check_mla_config(const MlaConfig& c) {
  if (c.kv_lora_rank <= 0 || c.qk_rope_head_dim <= 0 || c.qk_nope_head_dim <= 0 || c.v_head_dim <= 0 ||
      (c.q_lora_rank && *c.q_lora_rank <= 0)) {
    throw std::invalid_argument(
        "config: kv_lora_rank, q_lora_rank, qk_rope_head_dim, qk_nope_head_dim and v_head_dim must be positive");
  }
  if (c.qk_rope_head_dim % 2 != 0) throw std::invalid_argument("config: qk_rope_head_dim must be even");
}

MultiLatentAttention MultiLatentAttention::load(const Weights& w, int hidden_size, int heads, const MlaConfig& c,
                                                bool bias, const RopeConfig& rope_config) {
  const int rank = c.kv_lora_rank, nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, v = c.v_head_dim;
  const int q_out = heads * (nope + rope);
  auto [k_up, v_up] = up_projections(w, heads, rank, nope, v);
  MultiLatentAttention mla{
      .kv_a_proj = Linear::load(w.sub("kv_a_proj_with_mqa"), hidden_size, rank + rope, bias),
      .kv_a_norm = RMSNorm::load(w.sub("kv_a_layernorm"), rank, kLatentNormEps),
      .k_up = k_up,
      .v_up = v_up,
      .heads = heads,
      .config = c,
      .scale = yarn_softmax_scale(rope_config) / std::sqrt(static_cast<float>(nope + rope)),
  };
  if (c.q_lora_rank) {
    mla.q_a_proj = Linear::load(w.sub("q_a_proj"), hidden_size, *c.q_lora_rank, bias);
    mla.q_a_norm = RMSNorm::load(w.sub("q_a_layernorm"), *c.q_lora_rank, kLatentNormEps);
    mla.q_b_proj = Linear::load(w.sub("q_b_proj"), *c.q_lora_rank, q_out, false);
  } else {
    mla.q_proj = Linear::load(w.sub("q_proj"), hidden_size, q_out, false);
  }
  return mla;
}

mx::array MultiLatentAttention::operator()(const mx::array& x, KVCache* cache, int offset, const Rope& rope,
                                           const std::optional<mx::array>& mask) const {
  const int b = x.shape(0), t = x.shape(1);
  const int rank = config.kv_lora_rank, nope = config.qk_nope_head_dim, rope_dim = config.qk_rope_head_dim;
  auto q = q_proj ? (*q_proj)(x) : (*q_b_proj)((*q_a_norm)((*q_a_proj)(x)));
  q = heads_first(mx::reshape(q, {b, t, heads, nope + rope_dim}));  // [B, H, T, nope + rope]
  auto q_nope = axis_slice(q, -1, 0, nope);
  auto q_rope = rope(axis_slice(q, -1, nope, nope + rope_dim), offset);

  auto compressed = kv_a_proj(x);                                                    // [B, T, rank + rope]
  auto latent = mx::expand_dims(kv_a_norm(axis_slice(compressed, -1, 0, rank)), 1);  // [B, 1, T, rank]
  auto k_rope = rope(mx::expand_dims(axis_slice(compressed, -1, rank, rank + rope_dim), 1), offset);
  if (cache) std::tie(latent, k_rope) = cache->update_and_fetch(latent, k_rope);
  const int keys = latent.shape(2);

  // The rope part of every score, added to the sdpa's own (which scores the rest) as its mask.
  auto rope_scores = mx::matmul(mx::multiply(q_rope, mx::array(scale, q_rope.dtype())), mx::swapaxes(k_rope, -1, -2));
  std::optional<mx::array> allowed = mask;
  if (!allowed && t > 1) allowed = causal_mask(t, keys);
  rope_scores = masked_scores(rope_scores, allowed);

  mx::array out = q_nope;
  if (t == 1) {
    // Absorbed: score the latents with q_nope W_k, sum them, then apply W_v.
    auto q_latent = mx::matmul(q_nope, k_up);  // [B, H, 1, rank]
    out = mx::fast::scaled_dot_product_attention(q_latent, latent, latent, scale, "", rope_scores);
    out = mx::matmul(out, mx::swapaxes(v_up, -1, -2));  // [B, H, 1, v]
  } else {
    auto k = mx::matmul(latent, mx::swapaxes(k_up, -1, -2));  // [B, H, keys, nope]
    auto v = mx::matmul(latent, mx::swapaxes(v_up, -1, -2));  // [B, H, keys, v]
    out = mx::fast::scaled_dot_product_attention(q_nope, k, v, scale, "", rope_scores);
  }
  return merge_heads(out);
}

std::vector<mx::array> MultiLatentAttention::arrays() const {
  std::vector<mx::array> out{k_up, v_up, kv_a_norm.weight};
  for (const auto* layer : {&q_proj, &q_a_proj, &q_b_proj}) {
    if (*layer) {
      auto arrays = (*layer)->arrays();
      out.insert(out.end(), arrays.begin(), arrays.end());
    }
  }
  if (q_a_norm) out.push_back(q_a_norm->weight);
  auto kv_a = kv_a_proj.arrays();
  out.insert(out.end(), kv_a.begin(), kv_a.end());
  return out;
}

}  // namespace mlxr
