#include "nn/attention.h"

#include <cmath>

namespace mlxr {

namespace {

float scale_or_default(std::optional<float> scale, const mx::array& q) {
  return scale ? *scale : 1.0f / std::sqrt(static_cast<float>(q.shape(-1)));
}

}  // namespace

AttentionProjections AttentionProjections::load(const Weights& w, int dim, bool with_bias) {
  return AttentionProjections{
      .to_q = Linear::load(w.sub("to_q"), dim, dim, with_bias),
      .to_k = Linear::load(w.sub("to_k"), dim, dim, with_bias),
      .to_v = Linear::load(w.sub("to_v"), dim, dim, with_bias),
      .to_out = Linear::load(w.sub("to_out.0"), dim, dim, with_bias),
  };
}

mx::array split_heads(const mx::array& x, int heads) {
  return mx::reshape(x, {x.shape(0), x.shape(1), heads, x.shape(2) / heads});
}

mx::array heads_first(const mx::array& x) {
  return mx::transpose(x, {0, 2, 1, 3});
}

mx::array merge_heads(const mx::array& x) {
  return mx::reshape(mx::transpose(x, {0, 2, 1, 3}), {x.shape(0), x.shape(2), x.shape(1) * x.shape(3)});
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, const std::optional<mx::array>& mask,
                    std::optional<float> scale, const std::optional<mx::array>& sinks) {
  return mx::fast::scaled_dot_product_attention(q, k, v, scale_or_default(scale, q), "", mask, sinks);
}

mx::array causal_attention(const mx::array& q, const mx::array& k, const mx::array& v, std::optional<float> scale,
                           const std::optional<mx::array>& sinks) {
  // A single query is the last position: it sees every key, and needs no mask.
  return mx::fast::scaled_dot_product_attention(q, k, v, scale_or_default(scale, q), q.shape(2) > 1 ? "causal" : "",
                                                std::nullopt, sinks);
}

mx::array windowed_causal_attention(const mx::array& q, const mx::array& k, const mx::array& v, int window,
                                    std::optional<float> scale, const std::optional<mx::array>& sinks) {
  const int queries = q.shape(2), keys = k.shape(2);
  if (queries == 1 && keys <= window) return attention(q, k, v, std::nullopt, scale, sinks);
  return attention(q, k, v, sliding_window_mask(queries, keys, window), scale, sinks);
}

mx::array sliding_window_mask(int queries, int keys, int window) {
  // Query i is position keys - queries + i; key j is position j.
  auto query_pos = mx::expand_dims(mx::arange(keys - queries, keys, mx::int32), 1);
  auto key_pos = mx::expand_dims(mx::arange(keys, mx::int32), 0);
  auto distance = mx::subtract(query_pos, key_pos);
  return mx::logical_and(mx::greater_equal(distance, mx::array(0)), mx::less(distance, mx::array(window)));
}

mx::array padding_key_mask(const mx::array& attention_mask) {
  return mx::expand_dims(mx::not_equal(attention_mask, mx::array(0, attention_mask.dtype())), {1, 2});
}

mx::array causal_padding_key_mask(const mx::array& attention_mask) {
  const int t = attention_mask.shape(1);
  auto idx = mx::arange(t, mx::int32);
  auto causal = mx::greater_equal(mx::expand_dims(idx, 1), mx::expand_dims(idx, 0));
  return mx::logical_and(causal, padding_key_mask(attention_mask));
}

}  // namespace mlxr
