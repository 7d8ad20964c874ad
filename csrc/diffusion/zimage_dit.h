// Z-Image's S3-DiT (diffusers' ZImageTransformer2DModel) and its denoising loop.
//
// One single-stream transformer over [image tokens, caption tokens]: image tokens first pass
// through `noise_refiner` blocks (modulated by the timestep), caption tokens through
// `context_refiner` blocks (unmodulated), then both run through the main `layers` together.
// Every block is "sandwich"-normed: RMSNorm before and after attention and the FFN. Positions are
// 3-axis (frame, row, column) with RoPE on interleaved pairs. docs/models/zimage.md.
#pragma once

#include <algorithm>
#include <vector>

#include "diffusion/flow_match.h"
#include "nn/attention.h"
#include "nn/config_fields.h"
#include "nn/linear.h"
#include "nn/norm.h"
#include "nn/rope.h"

namespace mlxr {

// transformer/config.json (ZImageTransformer2DModel); defaults as its __init__'s (diffusers 0.42.1).
// diffusers lists patch sizes per resolution (all_patch_size, all_f_patch_size); this runs one.
struct ZImageConfig {
  int dim = 3840;
  int n_heads = 30;
  int n_kv_heads = 0;  // 0: n_heads (diffusers builds its attention from n_heads alone)
  int n_layers = 30;
  int n_refiner_layers = 2;
  int in_channels = 16;
  int patch_size = 2;
  int f_patch_size = 1;
  int cap_feat_dim = 2560;
  float norm_eps = 1e-5f;
  bool qk_norm = true;
  double rope_theta = 256.0;
  float t_scale = 1000.0f;
  std::vector<int> axes_dims{32, 48, 48};
  std::vector<int> axes_lens{1024, 512, 512};

  MLXR_CONFIG_FIELDS(ZImageConfig, dim, n_heads, n_kv_heads, n_layers, n_refiner_layers, in_channels, patch_size,
                     f_patch_size, cap_feat_dim, norm_eps, qk_norm, rope_theta, t_scale, axes_dims, axes_lens)

  int kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int head_dim() const { return dim / n_heads; }
  int adaln_dim() const { return std::min(dim, 256); }
  int ffn_dim() const { return static_cast<int>(dim / 3.0 * 8.0); }
};

struct ZImageBlock {
  // to_q | to_k | to_v as one product over the same input, and the FFN's w1 | w3 (gate | up) likewise: one wider
  // matmul instead of three (two), the same numbers (nn/linear.h, FusedLinear).
  FusedLinear to_qkv;
  Linear to_out;
  std::optional<RMSNorm> norm_q, norm_k;
  RMSNorm attention_norm1, attention_norm2, ffn_norm1, ffn_norm2;
  FusedLinear w1_w3;
  Linear w2;
  std::optional<Linear> adaln;  // absent in the (unmodulated) context refiner
};

// What the network's input is made of besides the latents and the timestep: the same at every
// step of one run, so the denoising loop prepares it once (ZImageTransformer::prepare).
struct ZImageInputs {
  mx::Shape latent_shape;               // [B, C, H, W]: the latents they were prepared for
  mx::array caption;                    // caption tokens after the context refiner [B, Lc, dim]
  RopeTable image_rope;                 // the noise refiner's
  RopeTable joint_rope;                 // the main layers' ([image, caption] tokens)
  std::optional<mx::array> joint_mask;  // keys of a ragged caption batch; none otherwise
};

class ZImageTransformer {
 public:
  // `quantization` lists the packed weights of a quantized checkpoint (nn/weights.h); they stay packed.
  ZImageTransformer(const ZImageConfig& config, const WeightMap& weights, const QuantMap& quantization = {});

  // One network evaluation. latents: [B, C, H, W] (diffusers' layout minus the frame axis; any
  // float dtype), t: [B] float32 in the model's convention (1 - sigma), captions: one [L_i,
  // cap_feat_dim] text embedding per sample (lengths may differ). Returns the model output,
  // float32 [B, C, H, W] (diffusers' raw transformer output; the velocity is its negation).
  mx::array forward(const mx::array& latents, const mx::array& t, const std::vector<mx::array>& captions) const;

  // The parts of forward() that do not change between steps: caption tokens through the context
  // refiner, RoPE tables, the key mask. Evaluated before it returns.
  ZImageInputs prepare(const mx::Shape& latent_shape, const std::vector<mx::array>& captions) const;
  // One network evaluation on prepared inputs; pushes each block's output to `queue` if given. With
  // `cache`, the main layers' first block decides whether the others run (StepCache).
  mx::array forward(const mx::array& latents, const mx::array& t, const ZImageInputs& inputs,
                    EvalQueue* queue = nullptr, StepCacheBranch* cache = nullptr) const;

  const ZImageConfig& config() const { return config_; }
  mx::Dtype dtype() const { return x_embedder_.dtype(); }
  // Every weight it holds: evaluating them reads the checkpoint and builds the fused projections (load time).
  std::vector<mx::array> arrays() const;

 private:
  mx::array timestep_embedding(const mx::array& t) const;
  mx::array block_forward(const ZImageBlock& block, const mx::array& x, const RopeTable& rope,
                          const std::optional<mx::array>& mask, const std::optional<mx::array>& adaln) const;
  mx::array attention(const ZImageBlock& block, const mx::array& x, const RopeTable& rope,
                      const std::optional<mx::array>& mask) const;
  RopeTable rope_table(const std::vector<std::vector<std::array<int, 3>>>& positions) const;

  ZImageConfig config_;
  std::vector<std::vector<double>> inv_freq_;  // per axis, float64 as diffusers computes them
  Linear x_embedder_;
  mx::array x_pad_token_, cap_pad_token_;
  Linear t_mlp0_, t_mlp2_;
  RMSNorm cap_norm_;
  Linear cap_linear_;
  std::vector<ZImageBlock> noise_refiner_, context_refiner_, layers_;
  Linear final_adaln_, final_linear_;
};

// The Z-Image sampling loop: Euler over `sigmas` from `latents` (float32 [1, C, H, W]), with true
// classifier-free guidance when `negative` is given: pred = pos + guidance * (pos - neg) (diffusers'
// convention: guidance 0 means off). Both halves run as one batch of 2, so a step cache decides for
// both at once (one branch; diffusers' FirstBlockCache does the same with this batched call).
std::optional<mx::array> zimage_denoise(const ZImageTransformer& model, const mx::array& latents,
                                        const std::vector<float>& sigmas, const mx::array& caption,
                                        const std::optional<mx::array>& negative, float guidance,
                                        const DenoiseControl& control);

}  // namespace mlxr
