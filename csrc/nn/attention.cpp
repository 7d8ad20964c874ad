#include "nn/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "nn/cpu_kernels.h"
#include "nn/slicing.h"

namespace mlxr {

float scale_or_default(std::optional<float> scale, int head_dim) {
  return scale ? *scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

float scale_or_default(std::optional<float> scale, const mx::array& q) {
  return scale_or_default(scale, q.shape(-1));
}

namespace {

// A bool mask that only picks keys per batch element ([B or 1, 1, 1, K], an encoder's padding mask) as
// [B or 1, K]: the masked softmax applies it in its own pass; anything else returns nothing.
std::optional<mx::array> key_padding_rows(const mx::array& mask, int batch, int keys) {
  if (mask.ndim() != 4 || mask.shape(1) != 1 || mask.shape(2) != 1 || mask.shape(3) != keys) return std::nullopt;
  if (mask.shape(0) != 1 && mask.shape(0) != batch) return std::nullopt;
  return mx::reshape(mask, {mask.shape(0), keys});
}

// What mx::fast::scaled_dot_product_attention runs on the CPU (the fallback in MLX 0.32's mlx/fast.cpp), op for op,
// with its softmax on all cores (nn/cpu_kernels.h): the same bits, faster. `mask` as SDPA takes it; `causal`
// builds MLX's causal mask instead.
mx::array attention_on_cpu(const mx::array& q, const mx::array& k, const mx::array& v,
                           const std::optional<mx::array>& mask, bool causal, float scale) {
  const int kv_heads = k.shape(1), repeats = q.shape(1) / kv_heads;
  auto queries = mx::multiply(mx::array(scale, q.dtype()), q);
  auto keys = k, values = v;
  if (repeats > 1) {  // grouped-query attention: each key/value head serves `repeats` query heads
    queries = mx::unflatten(queries, 1, {kv_heads, repeats});
    keys = mx::expand_dims(k, 2);
    values = mx::expand_dims(v, 2);
  }
  auto scores = mx::matmul(queries, mx::swapaxes(keys, -1, -2));
  if (!causal && mask && mask->dtype() == mx::bool_) {
    if (auto keys_allowed = key_padding_rows(*mask, q.shape(0), k.shape(-2))) {
      auto out = mx::matmul(masked_softmax_last_axis(scores, *keys_allowed), values);
      return repeats > 1 ? mx::flatten(out, 1, 2) : out;
    }
  }
  std::optional<mx::array> allowed;
  if (causal) {
    const int key_length = keys.shape(-2), query_length = queries.shape(-2), offset = key_length - query_length;
    allowed = mx::greater_equal(mx::expand_dims(mx::arange(offset, query_length + offset), 1),
                                mx::expand_dims(mx::arange(0, key_length), 0));
  } else if (mask) {
    auto shape = q.shape();
    shape.back() = k.shape(-2);
    allowed = mx::broadcast_to(mask->dtype() == mx::bool_ ? *mask : mx::astype(*mask, q.dtype()), shape);
  }
  if (allowed) {
    if (repeats > 1 && allowed->ndim() >= 3) {
      allowed =
          allowed->shape(-3) == 1 ? mx::expand_dims(*allowed, -3) : mx::unflatten(*allowed, -3, {kv_heads, repeats});
    }
    scores = allowed->dtype() == mx::bool_
                 ? mx::where(*allowed, scores, mx::array(std::numeric_limits<float>::lowest(), scores.dtype()))
                 : mx::add(scores, *allowed);
  }
  auto out = mx::matmul(softmax_last_axis(scores), values);
  return repeats > 1 ? mx::flatten(out, 1, 2) : out;
}

bool takes_cpu_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                         const std::optional<mx::array>& sinks) {
  return !sinks && on_cpu_kernels(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
}

// A half-precision attention on the CPU: MLX's CPU has no BLAS path for its products, so it runs in float32 on our
// kernels (q, k and v widened on every core) and rounds its output back. A bf16 model's 512-token prefill: 3.6 ->
// 1.3 s; its decode at a 2,048-token context 12.6 -> 14.5 tokens a second (the cache widened every step still costs
// less than MLX's half-precision matrix-vector products over it).
bool float32_on_cpu(const mx::array& q, const mx::array& k, const mx::array& v, const std::optional<mx::array>& sinks) {
  return half_precision(q.dtype()) && !sinks && k.dtype() == q.dtype() && v.dtype() == q.dtype() &&
         mx::default_device() == mx::Device::cpu;
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
  // One position (a decode step): [B, H, 1, D] is already in [B, 1, H, D]'s order, a reshape needs no copy.
  if (x.shape(2) == 1) return mx::reshape(x, {x.shape(0), 1, x.shape(1) * x.shape(3)});
  return mx::reshape(mx::transpose(x, {0, 2, 1, 3}), {x.shape(0), x.shape(2), x.shape(1) * x.shape(3)});
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, const std::optional<mx::array>& mask,
                    std::optional<float> scale, const std::optional<mx::array>& sinks) {
  if (float32_on_cpu(q, k, v, sinks)) {
    return mx::astype(
        attention(widened_to_float32(q), widened_to_float32(k), widened_to_float32(v), mask, scale, sinks), q.dtype());
  }
  if (takes_cpu_attention(q, k, v, sinks)) {
    // Unmasked or under a key padding mask, each head is one task on one core (nn/cpu_kernels.h). With fewer heads
    // than cores (a VAE's one head) MLX's products, each on every core, are faster; one query or one key would make
    // OpenBLAS's products matrix-vector ones, whose sums depend on the operands' layout: MLX's path.
    std::optional<mx::array> keys_allowed;
    if (mask && mask->dtype() == mx::bool_) keys_allowed = key_padding_rows(*mask, q.shape(0), k.shape(-2));
    const size_t heads = size_t(q.shape(0)) * size_t(q.shape(1));
    if ((!mask || keys_allowed) && heads >= cpu_cores() && q.shape(2) > 1 && k.shape(2) > 1) {
      return attention_cpu(q, k, v, scale_or_default(scale, q), keys_allowed);
    }
    return attention_on_cpu(q, k, v, mask, false, scale_or_default(scale, q));
  }
  return mx::fast::scaled_dot_product_attention(q, k, v, scale_or_default(scale, q), "", mask, sinks);
}

mx::array attention_in_query_bands(const mx::array& q, const mx::array& k, const mx::array& v, size_t max_scores,
                                   const std::optional<mx::array>& mask) {
  const int queries = q.shape(2), keys = k.shape(2);
  const size_t heads = size_t(q.shape(0)) * size_t(q.shape(1));
  const int band = int(std::clamp<size_t>(max_scores / (heads * size_t(keys)), 1, size_t(queries)));
  if (band == queries) return attention(q, k, v, mask);
  const bool mask_per_query = mask && mask->ndim() >= 2 && mask->shape(-2) == queries;
  std::vector<mx::array> outputs;
  for (int first = 0; first < queries; first += band) {
    const int last = std::min(queries, first + band);
    std::optional<mx::array> band_mask = mask;
    if (mask_per_query) band_mask = axis_slice(*mask, -2, first, last);
    outputs.push_back(attention(axis_slice(q, 2, first, last), k, v, band_mask));
    // Run now: MLX allocates an operation's output when it queues it and lets go of its inputs once it has run,
    // up to ten batches of queued operations ahead, so bands queued together would all hold their scores at once.
    mx::eval(outputs.back());
  }
  return mx::concatenate(outputs, 2);
}

mx::array causal_attention(const mx::array& q, const mx::array& k, const mx::array& v, std::optional<float> scale,
                           const std::optional<mx::array>& sinks) {
  if (float32_on_cpu(q, k, v, sinks)) {
    return mx::astype(
        causal_attention(widened_to_float32(q), widened_to_float32(k), widened_to_float32(v), scale, sinks), q.dtype());
  }
  // A single query is the last position: it sees every key, and needs no mask.
  if (takes_cpu_attention(q, k, v, sinks)) {
    return attention_on_cpu(q, k, v, std::nullopt, q.shape(2) > 1, scale_or_default(scale, q));
  }
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
