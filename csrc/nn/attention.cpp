#include "nn/attention.h"

#include <cmath>

namespace mlxr {

namespace {

float inverse_sqrt_head_dim(const mx::array& q) {
  return 1.0f / std::sqrt(static_cast<float>(q.shape(-1)));
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

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, const std::optional<mx::array>& mask) {
  const float scale = inverse_sqrt_head_dim(q);
  return mask ? mx::fast::scaled_dot_product_attention(q, k, v, scale, "", *mask)
              : mx::fast::scaled_dot_product_attention(q, k, v, scale, "");
}

mx::array causal_attention(const mx::array& q, const mx::array& k, const mx::array& v) {
  // A single query is the last position: it sees every key, and needs no mask.
  return mx::fast::scaled_dot_product_attention(q, k, v, inverse_sqrt_head_dim(q), q.shape(2) > 1 ? "causal" : "");
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
