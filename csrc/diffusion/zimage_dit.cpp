#include "diffusion/zimage_dit.h"

#include <array>
#include <cmath>
#include <stdexcept>

#include "nn/activation.h"
#include "nn/attention.h"
#include "nn/cpu_kernels.h"
#include "nn/cuda_dit_fusion.h"
#include "nn/weight_list.h"

namespace mlxr {

namespace {

constexpr int kSeqMultiple = 32;  // sequences are padded to a multiple of this (SEQ_MULTI_OF)

int round_up(int n, int multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

ZImageBlock load_block(const Weights& w, const ZImageConfig& c, bool modulated) {
  const int d = c.dim, hd = c.head_dim(), ffn = c.ffn_dim();
  auto attn = w.sub("attention");
  auto projections = AttentionProjections::load(attn, d, false);
  ZImageBlock block{.to_qkv = FusedLinear::fuse({projections.to_q, projections.to_k, projections.to_v}),
                    .to_out = projections.to_out,
                    .attention_norm1 = RMSNorm::load(w.sub("attention_norm1"), d, c.norm_eps),
                    .attention_norm2 = RMSNorm::load(w.sub("attention_norm2"), d, c.norm_eps),
                    .ffn_norm1 = RMSNorm::load(w.sub("ffn_norm1"), d, c.norm_eps),
                    .ffn_norm2 = RMSNorm::load(w.sub("ffn_norm2"), d, c.norm_eps),
                    .w1_w3 = FusedLinear::fuse({Linear::load(w.sub("feed_forward.w1"), d, ffn, false),
                                                Linear::load(w.sub("feed_forward.w3"), d, ffn, false)}),
                    .w2 = Linear::load(w.sub("feed_forward.w2"), ffn, d, false)};
  if (c.qk_norm) {
    // diffusers hard-codes eps 1e-5 for the per-head q/k norms, whatever norm_eps says.
    block.norm_q = RMSNorm::load(attn.sub("norm_q"), hd, 1e-5f);
    block.norm_k = RMSNorm::load(attn.sub("norm_k"), hd, 1e-5f);
  }
  if (modulated) block.adaln = Linear::load(w.sub("adaLN_modulation.0"), c.adaln_dim(), 4 * d);
  return block;
}

std::vector<ZImageBlock> load_blocks(const Weights& root, const std::string& name, int count, const ZImageConfig& c,
                                     bool modulated) {
  std::vector<ZImageBlock> blocks;
  for (int i = 0; i < count; ++i) blocks.push_back(load_block(root.sub(name + "." + std::to_string(i)), c, modulated));
  return blocks;
}

void check_config(const ZImageConfig& c) {
  int axes = 0;
  for (int a : c.axes_dims) axes += a;
  if (c.dim <= 0 || c.n_heads <= 0 || c.dim % c.n_heads != 0) {
    throw std::invalid_argument("Z-Image config: dim must be a multiple of n_heads");
  }
  if (c.kv_heads() != c.n_heads) throw std::invalid_argument("Z-Image config: n_kv_heads != n_heads is not supported");
  if (c.axes_dims.size() != 3 || c.axes_lens.size() != 3 || axes != c.head_dim()) {
    throw std::invalid_argument("Z-Image config: axes_dims must be 3 values summing to the head dim " +
                                std::to_string(c.head_dim()));
  }
  if (c.f_patch_size != 1) {
    throw std::invalid_argument("Z-Image config: only all_f_patch_size [1] (images) is supported");
  }
}

// Pads rows of `x` [B, T, D] with zeros up to `length` along axis 1.
mx::array pad_rows(const mx::array& x, int length) {
  if (x.shape(1) == length) return x;
  return mx::pad(x, {{0, 0}, {0, length - x.shape(1)}, {0, 0}});
}

// Per-head RMSNorm (when the block has one), then RoPE: [B, T, H, D] -> heads first. One kernel on CUDA and on the
// CPU (float32).
mx::array rotated_heads(const mx::array& x, const std::optional<RMSNorm>& norm, const RopeTable& rope) {
  if (auto fused = cuda_head_norm_rope_pairs(x, norm, rope.cos, rope.sin)) return heads_first(*fused);
  if (on_cpu_kernels(x) && (!norm || norm->weight.dtype() == mx::float32)) {
    return heads_first(head_norm_rope_cpu(x, norm ? std::optional(norm->weight) : std::nullopt, norm ? norm->eps : 0.0f,
                                          rope.cos, rope.sin));
  }
  return heads_first(apply_rope_pairs(norm ? (*norm)(x) : x, rope));
}

// Whether the CPU's modulated-norm kernels take x with this norm and per-batch vector (float32 throughout).
bool modulated_norm_on_cpu(const mx::array& x, const RMSNorm& norm, const mx::array& vector) {
  return cpu_modulation_vector(x, vector) && norm.weight.dtype() == mx::float32;
}

// norm(x) * scale: a modulated block's input. One kernel on CUDA and on the CPU.
mx::array scaled_norm(const RMSNorm& norm, const mx::array& x, const mx::array& scale) {
  if (auto fused = cuda_scaled_rms_norm(x, norm, scale)) return *fused;
  if (modulated_norm_on_cpu(x, norm, scale)) return scaled_rms_norm_cpu(x, norm.weight, norm.eps, scale);
  return mx::multiply(norm(x), scale);
}

// x + gate * a_norm(a), the sandwich-normed residual, and with `next` also next.norm of that sum times next.scale
// (the FFN's modulated input). One kernel on CUDA; two on the CPU.
std::pair<mx::array, std::optional<mx::array>> gated_residual(const mx::array& x, const mx::array& a,
                                                              const RMSNorm& a_norm, const mx::array& gate,
                                                              const std::optional<NextNorm>& next) {
  if (auto fused = cuda_gated_residual(x, a, a_norm, gate, next)) return *fused;
  if (modulated_norm_on_cpu(x, a_norm, gate) && a.dtype() == mx::float32) {
    auto h = gated_residual_cpu(x, a, a_norm.weight, a_norm.eps, gate);
    if (!next) return {h, std::nullopt};
    return {h, scaled_norm(next->norm, h, next->scale)};
  }
  auto h = mx::add(x, mx::multiply(gate, a_norm(a)));
  if (!next) return {h, std::nullopt};
  return {h, mx::multiply(next->norm(h), next->scale)};
}

}  // namespace

ZImageTransformer::ZImageTransformer(const ZImageConfig& config, const WeightMap& weights, const QuantMap& quantization)
    : config_((check_config(config), config)),
      x_embedder_(Linear::load(
          Weights(weights, quantization,
                  "all_x_embedder." + std::to_string(config.patch_size) + "-" + std::to_string(config.f_patch_size)),
          config.patch_size * config.patch_size * config.f_patch_size * config.in_channels, config.dim)),
      x_pad_token_(Weights(weights, quantization).get("x_pad_token", {1, config.dim})),
      cap_pad_token_(Weights(weights, quantization).get("cap_pad_token", {1, config.dim})),
      t_mlp0_(Linear::load(Weights(weights, quantization, "t_embedder.mlp.0"), 256, 1024)),
      t_mlp2_(Linear::load(Weights(weights, quantization, "t_embedder.mlp.2"), 1024, config.adaln_dim())),
      cap_norm_(RMSNorm::load(Weights(weights, quantization, "cap_embedder.0"), config.cap_feat_dim, config.norm_eps)),
      cap_linear_(Linear::load(Weights(weights, quantization, "cap_embedder.1"), config.cap_feat_dim, config.dim)),
      noise_refiner_(
          load_blocks(Weights(weights, quantization), "noise_refiner", config.n_refiner_layers, config, true)),
      context_refiner_(
          load_blocks(Weights(weights, quantization), "context_refiner", config.n_refiner_layers, config, false)),
      layers_(load_blocks(Weights(weights, quantization), "layers", config.n_layers, config, true)),
      final_adaln_(Linear::load(Weights(weights, quantization,
                                        "all_final_layer." + std::to_string(config.patch_size) + "-" +
                                            std::to_string(config.f_patch_size) + ".adaLN_modulation.1"),
                                config.adaln_dim(), config.dim)),
      final_linear_(Linear::load(Weights(weights, quantization,
                                         "all_final_layer." + std::to_string(config.patch_size) + "-" +
                                             std::to_string(config.f_patch_size) + ".linear"),
                                 config.dim, config.patch_size * config.patch_size * config.in_channels)) {
  inv_freq_ = axis_inverse_frequencies(config.axes_dims, config.rope_theta);
}

std::vector<mx::array> ZImageTransformer::arrays() const {
  WeightList out;
  for (const auto* layer : {&x_embedder_, &t_mlp0_, &t_mlp2_, &cap_linear_, &final_adaln_, &final_linear_}) {
    out.add(*layer);
  }
  out.add(x_pad_token_).add(cap_pad_token_).add(cap_norm_);
  for (const auto* blocks : {&noise_refiner_, &context_refiner_, &layers_}) {
    for (const auto& block : *blocks) {
      out.add(block.to_qkv).add(block.to_out).add(block.w1_w3).add(block.w2);
      for (const auto* norm : {&block.attention_norm1, &block.attention_norm2, &block.ffn_norm1, &block.ffn_norm2}) {
        out.add(*norm);
      }
      if (block.norm_q) out.add(*block.norm_q).add(*block.norm_k);
      if (block.adaln) out.add(*block.adaln);
    }
  }
  return out.arrays;
}

mx::array ZImageTransformer::timestep_embedding(const mx::array& t) const {
  // Sinusoid in float32 ([cos, sin], 128 frequencies), then the MLP in the model dtype.
  constexpr int half = 128;
  auto k = mx::arange(0, half, mx::float32);
  auto freqs = mx::exp(mx::divide(mx::multiply(mx::array(static_cast<float>(-std::log(10000.0))), k),
                                  mx::array(static_cast<float>(half))));
  auto args = mx::multiply(mx::expand_dims(mx::multiply(t, mx::array(config_.t_scale)), 1), mx::expand_dims(freqs, 0));
  auto emb = mx::astype(mx::concatenate({mx::cos(args), mx::sin(args)}, 1), t_mlp0_.dtype());
  return mx::astype(t_mlp2_(silu(t_mlp0_(emb))), dtype());
}

RopeTable ZImageTransformer::rope_table(const std::vector<std::vector<std::array<int, 3>>>& positions) const {
  const int b = static_cast<int>(positions.size());
  const int t = static_cast<int>(positions.front().size());
  const int half = config_.head_dim() / 2;
  std::vector<float> cos_values(static_cast<size_t>(b) * t * half), sin_values(cos_values.size());
  size_t at = 0;
  for (const auto& sample : positions) {
    for (const auto& pos : sample) {
      for (int axis = 0; axis < 3; ++axis) {
        if (pos[axis] >= config_.axes_lens[axis]) {
          throw std::invalid_argument("Z-Image: position " + std::to_string(pos[axis]) + " on RoPE axis " +
                                      std::to_string(axis) + " is past axes_lens " +
                                      std::to_string(config_.axes_lens[axis]) + " (image or prompt too large)");
        }
        for (double inv : inv_freq_[axis]) {
          // The angle in float64, rounded to float32, then cos/sin in float32 (torch.polar on complex64).
          const float angle = static_cast<float>(static_cast<double>(pos[axis]) * inv);
          cos_values[at] = std::cos(angle);
          sin_values[at] = std::sin(angle);
          ++at;
        }
      }
    }
  }
  return make_rope_table(mx::array(cos_values.data(), {b, t, 1, half}, mx::float32),
                         mx::array(sin_values.data(), {b, t, 1, half}, mx::float32));
}

mx::array ZImageTransformer::attention(const ZImageBlock& block, const mx::array& x, const RopeTable& rope,
                                       const std::optional<mx::array>& mask) const {
  const int h = config_.n_heads, dim = config_.dim;
  // [q | k | v] columns, each read in place (the fused CUDA norm + RoPE kernel takes the row stride).
  auto qkv = block.to_qkv.part_outputs(x, {dim, dim, dim});
  auto q = rotated_heads(split_heads(qkv[0], h), block.norm_q, rope);
  auto k = rotated_heads(split_heads(qkv[1], h), block.norm_k, rope);
  auto v = heads_first(split_heads(qkv[2], h));
  return block.to_out(merge_heads(mlxr::attention(q, k, v, mask)));
}

mx::array ZImageTransformer::block_forward(const ZImageBlock& block, const mx::array& x, const RopeTable& rope,
                                           const std::optional<mx::array>& mask,
                                           const std::optional<mx::array>& adaln) const {
  auto ffn = [&](const mx::array& y) {
    const int width = config_.ffn_dim();
    if (block.w1_w3.layers.size() == 1) {
      return block.w2(gated_silu_columns(block.w1_w3.layers[0](y), 0, width, width));  // [w1 y | w3 y]
    }
    auto parts = block.w1_w3.part_outputs(y, {width, width});
    return block.w2(gated_silu(parts[0], parts[1]));
  };
  if (!block.adaln) {
    auto h = mx::add(x, block.attention_norm2(attention(block, block.attention_norm1(x), rope, mask)));
    return mx::add(h, block.ffn_norm2(ffn(block.ffn_norm1(h))));
  }
  // scale_msa, gate_msa, scale_mlp, gate_mlp: scales are 1 + (.), gates tanh(.); no shift term.
  auto mod = mx::split(mx::expand_dims((*block.adaln)(*adaln), 1), 4, -1);
  auto one = mx::array(1.0f, mod[0].dtype());
  auto scale_msa = mx::add(one, mod[0]), gate_msa = mx::tanh(mod[1]);
  auto scale_mlp = mx::add(one, mod[2]), gate_mlp = mx::tanh(mod[3]);
  auto attn = attention(block, scaled_norm(block.attention_norm1, x, scale_msa), rope, mask);
  auto [h, ffn_input] = gated_residual(x, attn, block.attention_norm2, gate_msa, NextNorm{block.ffn_norm1, scale_mlp});
  return gated_residual(h, ffn(*ffn_input), block.ffn_norm2, gate_mlp, std::nullopt).first;
}

ZImageInputs ZImageTransformer::prepare(const mx::Shape& latent_shape, const std::vector<mx::array>& captions) const {
  const int p = config_.patch_size, dim = config_.dim;
  if (latent_shape.size() != 4 || latent_shape[1] != config_.in_channels || latent_shape[2] % p ||
      latent_shape[3] % p) {
    throw std::invalid_argument("Z-Image: latents must be [B, " + std::to_string(config_.in_channels) +
                                ", H, W] with H and W multiples of " + std::to_string(p) + ", got " +
                                shape_string(latent_shape));
  }
  const int b = latent_shape[0];
  if (static_cast<int>(captions.size()) != b) {
    throw std::invalid_argument("Z-Image: need one caption per latent");
  }
  const int ht = latent_shape[2] / p, wt = latent_shape[3] / p;
  const int n = ht * wt, n_padded = round_up(n, kSeqMultiple);
  const auto dt = dtype();

  // Caption tokens: each padded to a multiple of 32 with cap_pad_token; a batch of different
  // lengths is padded further (with zeros) to the longest, and those rows are masked as keys.
  std::vector<int> cap_lengths;
  std::vector<mx::array> caption_tokens;
  int cap_max = 0;
  for (const auto& caption : captions) {
    if (caption.ndim() != 2 || caption.shape(1) != config_.cap_feat_dim || caption.shape(0) < 1) {
      throw std::invalid_argument("Z-Image: a caption embedding must be [L >= 1, " +
                                  std::to_string(config_.cap_feat_dim) + "], got " + shape_string(caption.shape()));
    }
    const int len = caption.shape(0), padded = round_up(len, kSeqMultiple);
    auto tokens = cap_linear_(cap_norm_(mx::astype(caption, dt)));
    if (padded > len) {
      tokens = mx::concatenate({tokens, mx::astype(mx::broadcast_to(cap_pad_token_, {padded - len, dim}), dt)}, 0);
    }
    caption_tokens.push_back(tokens);
    cap_lengths.push_back(padded);
    cap_max = std::max(cap_max, padded);
  }
  std::vector<mx::array> padded_captions;
  for (const auto& tokens : caption_tokens) padded_captions.push_back(pad_rows(mx::expand_dims(tokens, 0), cap_max));
  auto caption = mx::concatenate(padded_captions, 0);

  // Positions (frame, row, column): caption row j -> (1 + j, 0, 0), pads included; image token
  // (h, w) -> (Lp + 1, h, w) with Lp the sample's padded caption length; image pads -> (0, 0, 0).
  std::vector<std::vector<std::array<int, 3>>> image_pos(b), caption_pos(b);
  bool ragged = false;
  for (int i = 0; i < b; ++i) {
    ragged |= cap_lengths[i] != cap_max;
    for (int y = 0; y < ht; ++y)
      for (int x = 0; x < wt; ++x) image_pos[i].push_back({cap_lengths[i] + 1, y, x});
    image_pos[i].resize(n_padded, {0, 0, 0});
    for (int j = 0; j < cap_max; ++j) caption_pos[i].push_back({j < cap_lengths[i] ? 1 + j : 0, 0, 0});
  }
  auto image_rope = rope_table(image_pos);
  auto caption_rope = rope_table(caption_pos);

  std::optional<mx::array> caption_mask, joint_mask;
  if (ragged) {
    std::vector<uint8_t> valid(static_cast<size_t>(b) * cap_max);
    for (int i = 0; i < b; ++i)
      for (int j = 0; j < cap_max; ++j) valid[i * cap_max + j] = j < cap_lengths[i];
    auto keys = mx::array(valid.data(), {b, cap_max}, mx::uint8);
    caption_mask = padding_key_mask(keys);
    joint_mask = padding_key_mask(mx::concatenate({mx::ones({b, n_padded}, mx::uint8), keys}, 1));
  }

  // The context refiner is unmodulated: its output is the same at every step, so it runs once here.
  for (const auto& block : context_refiner_) {
    caption = block_forward(block, caption, caption_rope, caption_mask, std::nullopt);
  }
  auto joint_rope = make_rope_table(mx::concatenate({image_rope.cos, caption_rope.cos}, 1),
                                    mx::concatenate({image_rope.sin, caption_rope.sin}, 1));
  mx::eval({caption, image_rope.with_x0, image_rope.with_x1, joint_rope.with_x0, joint_rope.with_x1});
  return ZImageInputs{.latent_shape = latent_shape,
                      .caption = caption,
                      .image_rope = image_rope,
                      .joint_rope = joint_rope,
                      .joint_mask = joint_mask};
}

mx::array ZImageTransformer::forward(const mx::array& latents, const mx::array& t,
                                     const std::vector<mx::array>& captions) const {
  return forward(latents, t, prepare(latents.shape(), captions));
}

mx::array ZImageTransformer::forward(const mx::array& latents, const mx::array& t, const ZImageInputs& in,
                                     EvalQueue* queue, StepCacheBranch* cache) const {
  if (latents.shape() != in.latent_shape) {
    throw std::invalid_argument("Z-Image: latents " + shape_string(latents.shape()) + " are not the " +
                                shape_string(in.latent_shape) + " the inputs were prepared for");
  }
  const int b = latents.shape(0), c = latents.shape(1), height = latents.shape(2), width = latents.shape(3);
  if (t.size() != static_cast<size_t>(b)) throw std::invalid_argument("Z-Image: need one timestep per latent");
  const int p = config_.patch_size, dim = config_.dim;
  const int ht = height / p, wt = width / p, n = ht * wt, n_padded = round_up(n, kSeqMultiple);
  const auto dt = dtype();
  auto pushed = [&](const mx::array& x) {
    if (queue) queue->push({x});
    return x;
  };

  // Timestep conditioning shared by every modulated block.
  auto adaln = timestep_embedding(mx::astype(t, mx::float32));

  // Image tokens: 2x2 patches, each a [ph][pw][c] vector (channel fastest), row-major over (h, w).
  auto patches = mx::reshape(mx::astype(latents, dt), {b, c, ht, p, wt, p});
  patches = mx::reshape(mx::transpose(patches, {0, 2, 4, 3, 5, 1}), {b, n, p * p * c});
  auto image = x_embedder_(patches);
  if (n_padded > n) {
    image = mx::concatenate({image, mx::broadcast_to(mx::astype(x_pad_token_, dt), {b, n_padded - n, dim})}, 1);
  }

  for (const auto& block : noise_refiner_) {
    image = pushed(block_forward(block, image, in.image_rope, std::nullopt, adaln));
  }
  auto layer = [&](const ZImageBlock& block, const mx::array& h) {
    return pushed(block_forward(block, h, in.joint_rope, in.joint_mask, adaln));
  };
  auto x = mx::concatenate({image, in.caption}, 1);
  if (cache && !layers_.empty()) {
    // The first main layer is the cache's head (diffusers' FirstBlockCache hooks `layers`, not the refiners).
    auto head = layer(layers_[0], x);
    if (cache->should_compute(mx::subtract(head, x))) {
      x = head;
      for (size_t i = 1; i < layers_.size(); ++i) x = layer(layers_[i], x);
      cache->remember(head, x);
    } else {
      x = cache->reuse(head);
    }
  } else {
    for (const auto& block : layers_) x = layer(block, x);
  }

  // Final layer on the image tokens (it is per token): LayerNorm without affine, scaled, projected.
  x = mx::slice(x, {0, 0, 0}, {b, n, dim});
  auto scale = mx::add(mx::array(1.0f, dt), mx::expand_dims(final_adaln_(silu(adaln)), 1));
  x = final_linear_(mx::multiply(mx::fast::layer_norm(x, std::nullopt, std::nullopt, 1e-6f), scale));

  // Unpatchify: [B, N, (ph, pw, c)] -> [B, C, H, W].
  x = mx::reshape(x, {b, ht, wt, p, p, c});
  x = mx::reshape(mx::transpose(x, {0, 5, 1, 3, 2, 4}), {b, c, height, width});
  return mx::astype(x, mx::float32);
}

std::optional<mx::array> zimage_denoise(const ZImageTransformer& model, const mx::array& latents,
                                        const std::vector<float>& sigmas, const mx::array& caption,
                                        const std::optional<mx::array>& negative, float guidance,
                                        const DenoiseControl& control) {
  EvalQueue queue(control.queue_depth, control.between_blocks);
  if (control.cache) control.cache->reset();
  StepCacheBranch* cache = control.cache ? &control.cache->branch(0) : nullptr;
  const bool cfg = negative.has_value();
  std::vector<mx::array> captions{caption};
  if (cfg) captions.push_back(*negative);
  auto input_shape = latents.shape();                        // prepare() checks it
  if (cfg && !input_shape.empty()) input_shape[0] *= 2;      // [x, x]: the prompt's half, the negative's
  const auto inputs = model.prepare(input_shape, captions);  // the same at every step
  auto velocity = [&](const mx::array& x, int step) {
    // The model's time runs the other way: t = (1000 - sigma * 1000) / 1000, in float32 as the pipeline computes it.
    const float timestep = sigmas[step] * 1000.0f;
    const float t_model = (1000.0f - timestep) / 1000.0f;
    const int batch = cfg ? 2 : 1;
    auto input = cfg ? mx::concatenate({x, x}, 0) : x;
    auto out = model.forward(input, mx::full({batch}, t_model, mx::float32), inputs, &queue, cache);
    if (cfg) {
      auto halves = mx::split(out, 2, 0);
      out = mx::add(halves[0], mx::multiply(mx::array(guidance), mx::subtract(halves[0], halves[1])));
    }
    return mx::negative(out);
  };
  return denoise(latents, sigmas, velocity, control.on_step, queue);
}

}  // namespace mlxr
