#include "diffusion/flux2_dit.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "nn/activation.h"
#include "nn/attention.h"
#include "nn/cpu_kernels.h"
#include "nn/cuda_dit_fusion.h"
#include "nn/slicing.h"
#include "nn/weight_list.h"

namespace mlxr {

namespace {

void check_config(const Flux2Config& c) {
  int axes = 0;
  for (int a : c.axes_dims_rope) {
    if (a <= 0 || a % 2) throw std::invalid_argument("FLUX.2 config: axes_dims_rope must be positive even numbers");
    axes += a;
  }
  if (c.attention_head_dim <= 0 || c.num_attention_heads <= 0 || c.in_channels <= 0 || c.joint_attention_dim <= 0) {
    throw std::invalid_argument(
        "FLUX.2 config: attention_head_dim, num_attention_heads, in_channels and "
        "joint_attention_dim must be positive");
  }
  if (c.axes_dims_rope.size() != 4 || axes != c.attention_head_dim) {
    throw std::invalid_argument("FLUX.2 config: axes_dims_rope must be 4 values summing to attention_head_dim " +
                                std::to_string(c.attention_head_dim));
  }
  if (c.patch_size != 1) throw std::invalid_argument("FLUX.2 config: only patch_size 1 is supported");
  if (c.guidance_embeds) {
    throw std::invalid_argument(
        "FLUX.2 config: guidance_embeds (FLUX.2-dev's guidance embedder) is not supported, "
        "only Klein models");
  }
}

Flux2DoubleBlock load_double(const Weights& w, const Flux2Config& c) {
  const int d = c.dim(), hd = c.attention_head_dim, m = c.mlp_hidden();
  auto attn = w.sub("attn");
  auto image = AttentionProjections::load(attn, d, false);
  return Flux2DoubleBlock{.to_qkv = FusedLinear::fuse({image.to_q, image.to_k, image.to_v}),
                          .to_out = image.to_out,
                          .add_qkv = FusedLinear::fuse({Linear::load(attn.sub("add_q_proj"), d, d, false),
                                                        Linear::load(attn.sub("add_k_proj"), d, d, false),
                                                        Linear::load(attn.sub("add_v_proj"), d, d, false)}),
                          .to_add_out = Linear::load(attn.sub("to_add_out"), d, d, false),
                          .norm_q = RMSNorm::load(attn.sub("norm_q"), hd, c.eps),
                          .norm_k = RMSNorm::load(attn.sub("norm_k"), hd, c.eps),
                          .norm_added_q = RMSNorm::load(attn.sub("norm_added_q"), hd, c.eps),
                          .norm_added_k = RMSNorm::load(attn.sub("norm_added_k"), hd, c.eps),
                          .ff_in = Linear::load(w.sub("ff.linear_in"), d, 2 * m, false),
                          .ff_out = Linear::load(w.sub("ff.linear_out"), m, d, false),
                          .ff_context_in = Linear::load(w.sub("ff_context.linear_in"), d, 2 * m, false),
                          .ff_context_out = Linear::load(w.sub("ff_context.linear_out"), m, d, false)};
}

Flux2SingleBlock load_single(const Weights& w, const Flux2Config& c) {
  const int d = c.dim(), hd = c.attention_head_dim, m = c.mlp_hidden();
  auto attn = w.sub("attn");
  return Flux2SingleBlock{.to_qkv_mlp = Linear::load(attn.sub("to_qkv_mlp_proj"), d, 3 * d + 2 * m, false),
                          .to_out = Linear::load(attn.sub("to_out"), d + m, d, false),
                          .norm_q = RMSNorm::load(attn.sub("norm_q"), hd, c.eps),
                          .norm_k = RMSNorm::load(attn.sub("norm_k"), hd, c.eps)};
}

// LayerNorm without affine parameters (every norm of the blocks), then one_plus_scale * . + shift. One kernel on CUDA
// and on the CPU.
mx::array modulate_by(const mx::array& x, const mx::array& shift, const mx::array& one_plus_scale, float eps) {
  if (auto fused = cuda_modulated_layer_norm(x, shift, one_plus_scale, eps)) return *fused;
  if (cpu_modulation_vector(x, shift) && cpu_modulation_vector(x, one_plus_scale)) {
    return modulated_layer_norm_cpu(x, shift, one_plus_scale, eps);
  }
  auto n = mx::fast::layer_norm(x, std::nullopt, std::nullopt, eps);
  return mx::add(mx::multiply(one_plus_scale, n), shift);
}

mx::array one_plus(const mx::array& scale) {
  return mx::add(mx::array(1.0f, scale.dtype()), scale);
}

// (1 + scale) * layer_norm(x) + shift.
mx::array modulate(const mx::array& x, const mx::array& shift, const mx::array& scale, float eps) {
  return modulate_by(x, shift, one_plus(scale), eps);
}

// x + gate * y: a block's gated residual. One pass on every core on the CPU.
mx::array gated_add(const mx::array& x, const mx::array& y, const mx::array& gate) {
  if (cpu_modulation_vector(x, gate) && y.shape() == x.shape() && y.dtype() == mx::float32) {
    return gated_sum_cpu(x, y, gate);
  }
  return mx::add(x, mx::multiply(gate, y));
}

// h = x + gate * y (a block's residual), and modulate(h, shift, scale): one kernel on CUDA, two on the CPU.
std::pair<mx::array, mx::array> residual_then_modulate(const mx::array& x, const mx::array& y, const mx::array& gate,
                                                       const mx::array& shift, const mx::array& scale, float eps) {
  auto one_plus_scale = one_plus(scale);
  if (auto fused = cuda_gated_residual_modulated_layer_norm(x, GatedTerm{y, gate}, shift, one_plus_scale, eps)) {
    return *fused;
  }
  auto h = gated_add(x, y, gate);
  return {h, modulate_by(h, shift, one_plus_scale, eps)};
}

// SwiGLU with the gate in the first half.
mx::array swiglu(const mx::array& u) {
  const int half = u.shape(-1) / 2;
  return gated_silu_columns(u, 0, half, half);
}

// Queries or keys [B, T, H, D]: per-head RMSNorm, then RoPE by the table rows [first, first + T). One kernel on
// CUDA and on the CPU (float32); nothing elsewhere (the callers then run MLX's operations over the whole joint
// sequence).
std::optional<mx::array> fused_rotated_heads(const mx::array& x, const RMSNorm& norm, const Flux2Rope& rope,
                                             int first) {
  const int last = first + x.shape(1);
  auto cos = axis_slice(rope.cos, 1, first, last), sin = axis_slice(rope.sin, 1, first, last);
  if (auto fused = cuda_head_norm_rope_pairs(x, norm, cos, sin)) return fused;
  if (on_cpu_kernels(x) && norm.weight.dtype() == mx::float32 && cos.dtype() == mx::float32) {
    return head_norm_rope_cpu(x, norm.weight, norm.eps, cos, sin);
  }
  return std::nullopt;
}

// The text's queries (or keys) then the image's, each normed by its own stream's norm, rotated over the joint
// sequence: [B, Lt + Li, H, D].
mx::array joint_rotated(const mx::array& text, const RMSNorm& text_norm, const mx::array& image,
                        const RMSNorm& image_norm, const Flux2Rope& rope) {
  const int text_len = text.shape(1);
  auto fused_text = fused_rotated_heads(text, text_norm, rope, 0);
  auto fused_image = fused_text ? fused_rotated_heads(image, image_norm, rope, text_len) : std::nullopt;
  if (fused_image) return mx::concatenate({*fused_text, *fused_image}, 1);
  return apply_rope_pairs(mx::concatenate({text_norm(text), image_norm(image)}, 1), rope);
}

// Queries or keys of the sequence's rows [first, first + T), normed and rotated by those rows of the table:
// [B, T, H, D].
mx::array rotated(const mx::array& x, const RMSNorm& norm, const Flux2Rope& rope, int first = 0) {
  if (auto fused = fused_rotated_heads(x, norm, rope, first)) return *fused;
  const int last = first + x.shape(1);
  auto rows = [&](const mx::array& table) { return axis_slice(table, 1, first, last); };
  return apply_rope_pairs(norm(x), Flux2Rope{rows(rope.cos), rows(rope.sin), rows(rope.with_x0), rows(rope.with_x1)});
}

}  // namespace

double flux2_empirical_mu(int image_seq_len, int num_steps) {
  const double a1 = 8.73809524e-05, b1 = 1.89833333, a2 = 0.00016927, b2 = 0.45666666;
  if (image_seq_len > 4300) return a2 * image_seq_len + b2;
  const double m200 = a2 * image_seq_len + b2, m10 = a1 * image_seq_len + b1;
  const double a = (m200 - m10) / 190.0, b = m200 - 200.0 * a;
  return a * num_steps + b;
}

Flux2Transformer::Flux2Transformer(const Flux2Config& config, const WeightMap& weights, const QuantMap& quantization)
    : config_((check_config(config), config)),
      t_linear_1_(Linear::load(Weights(weights, quantization, "time_guidance_embed.timestep_embedder.linear_1"),
                               config.timestep_guidance_channels, config.dim(), false)),
      t_linear_2_(Linear::load(Weights(weights, quantization, "time_guidance_embed.timestep_embedder.linear_2"),
                               config.dim(), config.dim(), false)),
      mod_img_(Linear::load(Weights(weights, quantization, "double_stream_modulation_img.linear"), config.dim(),
                            6 * config.dim(), false)),
      mod_txt_(Linear::load(Weights(weights, quantization, "double_stream_modulation_txt.linear"), config.dim(),
                            6 * config.dim(), false)),
      mod_single_(Linear::load(Weights(weights, quantization, "single_stream_modulation.linear"), config.dim(),
                               3 * config.dim(), false)),
      x_embedder_(Linear::load(Weights(weights, quantization, "x_embedder"), config.in_channels, config.dim(), false)),
      context_embedder_(Linear::load(Weights(weights, quantization, "context_embedder"), config.joint_attention_dim,
                                     config.dim(), false)),
      norm_out_(Linear::load(Weights(weights, quantization, "norm_out.linear"), config.dim(), 2 * config.dim(), false)),
      proj_out_(
          Linear::load(Weights(weights, quantization, "proj_out"), config.dim(), config.output_channels(), false)) {
  Weights root(weights, quantization);
  for (int i = 0; i < config.num_layers; ++i) {
    double_blocks_.push_back(load_double(root.sub("transformer_blocks." + std::to_string(i)), config));
  }
  for (int i = 0; i < config.num_single_layers; ++i) {
    single_blocks_.push_back(load_single(root.sub("single_transformer_blocks." + std::to_string(i)), config));
  }
  inv_freq_ = axis_inverse_frequencies(config.axes_dims_rope, config.rope_theta);
}

std::vector<mx::array> Flux2Transformer::arrays() const {
  WeightList out;
  for (const auto* layer : {&t_linear_1_, &t_linear_2_, &mod_img_, &mod_txt_, &mod_single_, &x_embedder_,
                            &context_embedder_, &norm_out_, &proj_out_}) {
    out.add(*layer);
  }
  for (const auto& block : double_blocks_) {
    out.add(block.to_qkv).add(block.to_out).add(block.add_qkv).add(block.to_add_out);
    out.add(block.ff_in).add(block.ff_out).add(block.ff_context_in).add(block.ff_context_out);
    for (const auto* norm : {&block.norm_q, &block.norm_k, &block.norm_added_q, &block.norm_added_k}) out.add(*norm);
  }
  for (const auto& block : single_blocks_)
    out.add(block.to_qkv_mlp).add(block.to_out).add(block.norm_q).add(block.norm_k);
  return out.arrays;
}

Flux2Rope Flux2Transformer::rope_table(const std::vector<Flux2Id>& ids) const {
  const int length = static_cast<int>(ids.size());
  const int half = config_.attention_head_dim / 2;
  std::vector<float> cos_values(static_cast<size_t>(length) * half), sin_values(cos_values.size());
  size_t at = 0;
  for (const auto& id : ids) {
    for (int axis = 0; axis < 4; ++axis) {
      // diffusers: float32 positions times float64 frequencies, cos/sin in float64, then float32.
      const double pos = static_cast<double>(static_cast<float>(id[axis]));
      for (double inv : inv_freq_[axis]) {
        const double angle = pos * inv;
        cos_values[at] = static_cast<float>(std::cos(angle));
        sin_values[at] = static_cast<float>(std::sin(angle));
        ++at;
      }
    }
  }
  return make_rope_table(mx::array(cos_values.data(), {1, length, 1, half}, mx::float32),
                         mx::array(sin_values.data(), {1, length, 1, half}, mx::float32));
}

mx::array Flux2Transformer::time_embedding(const mx::array& timestep) const {
  // The model scales the pipeline's t / 1000 back by 1000 in its own dtype (bf16 rounds here), then
  // the [cos | sin] sinusoid in float32, then the MLP in the model dtype.
  const auto dt = dtype();
  auto tau = mx::astype(mx::multiply(mx::astype(timestep, dt), mx::array(1000.0f, dt)), mx::float32);
  const int half = config_.timestep_guidance_channels / 2;
  auto k = mx::arange(0, half, mx::float32);
  auto freqs = mx::exp(mx::divide(mx::multiply(mx::array(static_cast<float>(-std::log(10000.0))), k),
                                  mx::array(static_cast<float>(half))));
  auto args = mx::multiply(mx::expand_dims(tau, 1), mx::expand_dims(freqs, 0));
  auto emb = mx::astype(mx::concatenate({mx::cos(args), mx::sin(args)}, 1), dt);
  return t_linear_2_(silu(t_linear_1_(emb)));
}

mx::array Flux2Transformer::attention(const mx::array& q, const mx::array& k, const mx::array& v) const {
  return merge_heads(mlxr::attention(heads_first(q), heads_first(k), heads_first(v)));
}

std::pair<mx::array, mx::array> Flux2Transformer::double_block(const Flux2DoubleBlock& block, const mx::array& x,
                                                               const mx::array& c,
                                                               const std::vector<mx::array>& mod_img,
                                                               const std::vector<mx::array>& mod_txt,
                                                               const Flux2Rope& rope) const {
  const int h = config_.num_attention_heads;
  const float eps = config_.eps;
  const int text_len = c.shape(1);
  // (shift, scale, gate) for attention, then for the MLP; the same for the text stream.
  auto nx = modulate(x, mod_img[0], mod_img[1], eps);
  auto nc = modulate(c, mod_txt[0], mod_txt[1], eps);
  const int d = config_.dim();
  // [q | k | v] columns of each stream, read in place (the fused norm + RoPE kernel takes the row stride).
  auto text = block.add_qkv.part_outputs(nc, {d, d, d});
  auto image = block.to_qkv.part_outputs(nx, {d, d, d});
  auto q = joint_rotated(split_heads(text[0], h), block.norm_added_q, split_heads(image[0], h), block.norm_q, rope);
  auto k = joint_rotated(split_heads(text[1], h), block.norm_added_k, split_heads(image[1], h), block.norm_k, rope);
  auto v = mx::concatenate({split_heads(text[2], h), split_heads(image[2], h)}, 1);
  auto out = attention(q, k, v);
  const int b = out.shape(0), total = out.shape(1), width = out.shape(2);
  auto out_c = mx::slice(out, {0, 0, 0}, {b, text_len, width});
  auto out_x = mx::slice(out, {0, text_len, 0}, {b, total, width});

  auto [x1, x1_modulated] = residual_then_modulate(x, block.to_out(out_x), mod_img[2], mod_img[3], mod_img[4], eps);
  auto x2 = gated_add(x1, block.ff_out(swiglu(block.ff_in(x1_modulated))), mod_img[5]);

  auto [c1, c1_modulated] = residual_then_modulate(c, block.to_add_out(out_c), mod_txt[2], mod_txt[3], mod_txt[4], eps);
  auto c2 = gated_add(c1, block.ff_context_out(swiglu(block.ff_context_in(c1_modulated))), mod_txt[5]);
  return {x2, c2};
}

mx::array Flux2Transformer::single_block(const Flux2SingleBlock& block, const mx::array& hs,
                                         const std::vector<mx::array>& mod, const Flux2Rope& rope,
                                         std::optional<std::pair<int, int>> rows) const {
  const int h = config_.num_attention_heads, d = config_.dim();
  const int m = config_.mlp_hidden();
  auto n = modulate(hs, mod[0], mod[1], config_.eps);
  if (rows) return single_block_rows(block, hs, n, mod, rope, rows->first, rows->second);
  auto p = block.to_qkv_mlp(n);
  // [q | k | v | gate | up]: each range read in place
  auto parts = mx::split(p, mx::Shape{d, 2 * d, 3 * d}, -1);
  auto q = rotated(split_heads(parts[0], h), block.norm_q, rope);
  auto k = rotated(split_heads(parts[1], h), block.norm_k, rope);
  auto attn = attention(q, k, split_heads(parts[2], h));
  auto mlp = gated_silu_columns(p, 3 * d, 3 * d + m, m);
  auto out = block.to_out(mx::concatenate({attn, mlp}, -1));
  return gated_add(hs, out, mod[2]);
}

mx::array Flux2Transformer::single_block_rows(const Flux2SingleBlock& block, const mx::array& hs, const mx::array& n,
                                              const std::vector<mx::array>& mod, const Flux2Rope& rope, int first,
                                              int end) const {
  const int h = config_.num_attention_heads, d = config_.dim();
  const int m = config_.mlp_hidden();
  // Every row's keys and values; the queries and the MLP (two thirds of the fused projection's columns) of the wanted
  // rows only: in an edit, whose reference tokens are half the sequence, a third of the block's products are left out.
  auto kv = block.to_qkv_mlp.outputs(d, 3 * d)(n);
  auto wanted = axis_slice(n, 1, first, end);
  auto q = rotated(split_heads(block.to_qkv_mlp.outputs(0, d)(wanted), h), block.norm_q, rope, first);
  auto k = rotated(split_heads(axis_slice(kv, -1, 0, d), h), block.norm_k, rope);
  auto attn = attention(q, k, split_heads(axis_slice(kv, -1, d, 2 * d), h));
  auto mlp = gated_silu_columns(block.to_qkv_mlp.outputs(3 * d, 3 * d + 2 * m)(wanted), 0, m, m);
  auto out = block.to_out(mx::concatenate({attn, mlp}, -1));
  return gated_add(axis_slice(hs, 1, first, end), out, mod[2]);
}

mx::array Flux2Transformer::forward(const mx::array& hidden, const mx::array& context, const mx::array& timestep,
                                    const Flux2Rope& rope, EvalQueue* queue, StepCacheBranch* cache,
                                    int output_tokens) const {
  const auto& c = config_;
  if (hidden.ndim() != 3 || hidden.shape(2) != c.in_channels) {
    throw std::invalid_argument("FLUX.2: image tokens must be [B, L, " + std::to_string(c.in_channels) + "], got " +
                                shape_string(hidden.shape()));
  }
  if (context.ndim() != 3 || context.shape(2) != c.joint_attention_dim || context.shape(0) != hidden.shape(0)) {
    throw std::invalid_argument("FLUX.2: the text embedding must be [B, T, " + std::to_string(c.joint_attention_dim) +
                                "], got " + shape_string(context.shape()));
  }
  const int b = hidden.shape(0), text_len = context.shape(1), image_len = hidden.shape(1);
  if (rope.cos.shape(1) != text_len + image_len) {
    throw std::invalid_argument("FLUX.2: " + std::to_string(rope.cos.shape(1)) + " position ids for " +
                                std::to_string(text_len) + " text and " + std::to_string(image_len) + " image tokens");
  }
  if (timestep.size() != static_cast<size_t>(b)) throw std::invalid_argument("FLUX.2: need one timestep per sample");
  if (output_tokens > image_len) {
    throw std::invalid_argument("FLUX.2: " + std::to_string(output_tokens) + " output tokens asked of " +
                                std::to_string(image_len) + " image tokens");
  }
  const int kept = output_tokens < 0 ? image_len : output_tokens;
  const auto dt = dtype();

  auto temb = time_embedding(mx::reshape(timestep, {b}));
  auto act = silu(temb);
  auto chunks = [&](const Linear& linear, int n) { return mx::split(mx::expand_dims(linear(act), 1), n, -1); };
  auto mod_img = chunks(mod_img_, 6), mod_txt = chunks(mod_txt_, 6), mod_single = chunks(mod_single_, 3);

  auto x = x_embedder_(mx::astype(hidden, dt));
  auto ctx = context_embedder_(mx::astype(context, dt));
  mx::array y = x;
  if (cache && !double_blocks_.empty()) {
    // The first double block is the cache's head; its residual is the image stream's (diffusers'
    // hidden_states). The tail residual is taken on the kept image tokens only, the rows the last block computes.
    auto [head, head_ctx] = double_block(double_blocks_[0], x, ctx, mod_img, mod_txt, rope);
    if (queue) queue->push({head, head_ctx});
    auto kept_head = axis_slice(head, 1, 0, kept);  // the tail residual of the rows the model returns
    if (cache->should_compute(mx::subtract(head, x))) {
      y = blocks_from(1, head, head_ctx, mod_img, mod_txt, mod_single, rope, queue, kept);
      cache->remember(kept_head, y);
    } else {
      y = cache->reuse(kept_head);
    }
  } else {
    y = blocks_from(0, x, ctx, mod_img, mod_txt, mod_single, rope, queue, kept);
  }

  // AdaLayerNormContinuous: (scale, shift), scale first.
  auto final_mod = mx::split(mx::expand_dims(norm_out_(act), 1), 2, -1);
  y = mx::add(mx::multiply(mx::fast::layer_norm(y, std::nullopt, std::nullopt, c.eps),
                           mx::add(mx::array(1.0f, dt), final_mod[0])),
              final_mod[1]);
  return mx::astype(proj_out_(y), mx::float32);
}

mx::array Flux2Transformer::blocks_from(size_t first, mx::array x, mx::array ctx, const std::vector<mx::array>& mod_img,
                                        const std::vector<mx::array>& mod_txt, const std::vector<mx::array>& mod_single,
                                        const Flux2Rope& rope, EvalQueue* queue, int kept) const {
  for (size_t i = first; i < double_blocks_.size(); ++i) {
    std::tie(x, ctx) = double_block(double_blocks_[i], x, ctx, mod_img, mod_txt, rope);
    if (queue) queue->push({x, ctx});
  }
  const int text_len = ctx.shape(1);
  if (single_blocks_.empty()) return axis_slice(x, 1, 0, kept);
  auto hs = mx::concatenate({ctx, x}, 1);
  for (size_t i = 0; i + 1 < single_blocks_.size(); ++i) {
    hs = single_block(single_blocks_[i], hs, mod_single, rope);
    if (queue) queue->push({hs});
  }
  // The last block computes the kept image rows only: the text's and the references' outputs are dropped.
  hs = single_block(single_blocks_.back(), hs, mod_single, rope, std::pair{text_len, text_len + kept});
  if (queue) queue->push({hs});
  return hs;
}

std::optional<mx::array> flux2_denoise(const Flux2Transformer& model, const mx::array& latents,
                                       const std::vector<Flux2Id>& latent_ids, const std::vector<float>& sigmas,
                                       const mx::array& prompt, const std::optional<mx::array>& negative,
                                       float guidance, const std::optional<mx::array>& references,
                                       const std::vector<Flux2Id>& reference_ids, const DenoiseControl& control) {
  EvalQueue queue(control.queue_depth, control.between_blocks);
  if (control.cache) control.cache->reset();
  auto branch = [&](int index) { return control.cache ? &control.cache->branch(index) : nullptr; };
  if (latents.ndim() != 3 || latents.shape(0) != 1 || latents.shape(1) != static_cast<int>(latent_ids.size())) {
    throw std::invalid_argument("FLUX.2: latents must be [1, L, C] with one id per token, got " +
                                shape_string(latents.shape()) + " and " + std::to_string(latent_ids.size()) + " ids");
  }
  if (references && (references->ndim() != 3 || references->shape(1) != static_cast<int>(reference_ids.size()))) {
    throw std::invalid_argument("FLUX.2: reference tokens must be [1, Lr, C] with one id per token");
  }
  const auto dt = model.dtype();
  const int noise_len = latents.shape(1);
  auto rope_for = [&](int text_len) {
    auto ids = flux2_text_ids(text_len);
    ids.insert(ids.end(), latent_ids.begin(), latent_ids.end());
    ids.insert(ids.end(), reference_ids.begin(), reference_ids.end());
    return model.rope_table(ids);
  };
  const auto rope = rope_for(prompt.shape(1));
  const bool cfg = negative.has_value();
  const auto negative_rope = cfg && negative->shape(1) != prompt.shape(1) ? rope_for(negative->shape(1)) : rope;
  const auto prompt_in = mx::astype(prompt, dt);
  const auto negative_in = cfg ? std::optional<mx::array>(mx::astype(*negative, dt)) : std::nullopt;
  const auto refs_in = references ? std::optional<mx::array>(mx::astype(*references, dt)) : std::nullopt;

  auto velocity = [&](const mx::array& x, int step) {
    // diffusers: t = sigma * 1000 (float32) -> latents dtype -> / 1000; the model multiplies by 1000 again.
    auto t = mx::divide(mx::astype(mx::array(sigmas[step] * 1000.0f), dt), mx::array(1000.0f, dt));
    t = mx::reshape(t, {1});
    auto input = mx::astype(x, dt);
    if (refs_in) input = mx::concatenate({input, *refs_in}, 1);
    // The noise tokens' velocities only (the references come after them).
    auto v = model.forward(input, prompt_in, t, rope, &queue, branch(0), noise_len);
    if (cfg) {
      auto v_neg = model.forward(input, *negative_in, t, negative_rope, &queue, branch(1), noise_len);
      v = mx::add(v_neg, mx::multiply(mx::array(guidance), mx::subtract(v, v_neg)));
    }
    return v;
  };
  return denoise(latents, sigmas, velocity, control.on_step, queue);
}

}  // namespace mlxr
