// FLUX.2's MM-DiT (diffusers' Flux2Transformer2DModel, as FLUX.2 Klein configures it) and the Klein
// denoising loop.
//
// Text tokens (Qwen3 features) and image tokens (packed 2x2-patchified VAE latents: the noise, then
// any reference images) run through `num_layers` double-stream blocks (separate weights per
// stream, joint attention), then through `num_single_layers` single-stream "parallel" blocks over
// [text | image]. Modulation is shared: three linears of the timestep embedding, computed once per
// call, feed every block. Positions are 4-axis (T, H, W, L) ids with RoPE on interleaved pairs.
// No guidance embedder (Klein's guidance_embeds is false). docs/models/flux2_klein.md.
#pragma once

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "diffusion/flow_match.h"
#include "diffusion/flux2_latents.h"
#include "nn/attention.h"
#include "nn/config_fields.h"
#include "nn/linear.h"
#include "nn/norm.h"
#include "nn/rope.h"

namespace mlxr {

// transformer/config.json (Flux2Transformer2DModel); defaults as its __init__'s (diffusers 0.42.1),
// which describe FLUX.2-dev: Klein configs set every value, guidance_embeds false among them.
struct Flux2Config {
  int patch_size = 1;  // only 1 (the pipeline patchifies the latents itself)
  int in_channels = 128;
  int out_channels = 0;  // 0 (config null): in_channels
  int num_layers = 8;
  int num_single_layers = 48;
  int attention_head_dim = 128;
  int num_attention_heads = 48;
  int joint_attention_dim = 15360;
  int timestep_guidance_channels = 256;
  float mlp_ratio = 3.0f;
  std::vector<int> axes_dims_rope{32, 32, 32, 32};
  double rope_theta = 2000.0;
  float eps = 1e-6f;
  bool guidance_embeds = true;  // FLUX.2-dev's guidance embedder: not supported

  MLXR_CONFIG_FIELDS(Flux2Config, patch_size, in_channels, out_channels, num_layers, num_single_layers,
                     attention_head_dim, num_attention_heads, joint_attention_dim, timestep_guidance_channels,
                     mlp_ratio, axes_dims_rope, rope_theta, eps, guidance_embeds)

  int dim() const { return attention_head_dim * num_attention_heads; }
  int mlp_hidden() const { return static_cast<int>(dim() * mlp_ratio); }
  int output_channels() const { return out_channels > 0 ? out_channels : in_channels; }
};

struct Flux2DoubleBlock {
  // Each stream's q | k | v as one product over its input (nn/linear.h, FusedLinear): the same numbers.
  FusedLinear to_qkv;  // the image stream's
  Linear to_out;
  FusedLinear add_qkv;  // the text stream's
  Linear to_add_out;
  RMSNorm norm_q, norm_k, norm_added_q, norm_added_k;
  Linear ff_in, ff_out, ff_context_in, ff_context_out;
};

struct Flux2SingleBlock {
  Linear to_qkv_mlp, to_out;
  RMSNorm norm_q, norm_k;
};

// cos/sin of the RoPE angle of every (token, pair): [1, L, 1, head_dim / 2], float32.
using Flux2Rope = RopeTable;

class Flux2Transformer {
 public:
  // `quantization` lists the packed weights of a quantized checkpoint (nn/weights.h); they stay packed.
  Flux2Transformer(const Flux2Config& config, const WeightMap& weights, const QuantMap& quantization = {});

  // The RoPE table for a sequence of positions (text first, then image tokens, as the model orders
  // them). Frequencies, angles and cos/sin in float64, rounded to float32 (diffusers' Flux2PosEmbed).
  Flux2Rope rope_table(const std::vector<Flux2Id>& ids) const;

  // One evaluation. hidden [B, L, in_channels] (noise tokens then reference tokens), context
  // [B, T, joint_attention_dim], timestep [B] as the pipeline passes it (t / 1000, i.e. sigma; the
  // model scales it by 1000 in its own dtype), rope from rope_table(text ids ++ image ids).
  // Returns the raw output for the first `output_tokens` image tokens (-1: every one), float32
  // [B, output_tokens, out_channels]: the denoiser asks for the noise tokens' only, and the last single block then
  // computes no output for the text and reference tokens (their keys and values still enter its attention). Pushes
  // each block's output to `queue` if given (the denoising loop's; see EvalQueue). With `cache`, the first double
  // block decides on its image-stream residual whether the other blocks run (StepCache).
  mx::array forward(const mx::array& hidden, const mx::array& context, const mx::array& timestep, const Flux2Rope& rope,
                    EvalQueue* queue = nullptr, StepCacheBranch* cache = nullptr, int output_tokens = -1) const;

  const Flux2Config& config() const { return config_; }
  // Every weight it holds: evaluating them reads the checkpoint and builds the fused projections (load time).
  std::vector<mx::array> arrays() const;
  mx::Dtype dtype() const { return x_embedder_.dtype(); }

 private:
  mx::array time_embedding(const mx::array& timestep) const;
  // Returns (image, text) after the block.
  std::pair<mx::array, mx::array> double_block(const Flux2DoubleBlock& block, const mx::array& x, const mx::array& c,
                                               const std::vector<mx::array>& mod_img,
                                               const std::vector<mx::array>& mod_txt, const Flux2Rope& rope) const;
  // Every row of h in, every row out; or, given `rows` [first, last), only those rows' outputs (all rows' keys and
  // values still attend).
  mx::array single_block(const Flux2SingleBlock& block, const mx::array& h, const std::vector<mx::array>& mod,
                         const Flux2Rope& rope, std::optional<std::pair<int, int>> rows = std::nullopt) const;
  // single_block's `rows` case, given the block's modulated input n: rows [first, end) of its output.
  mx::array single_block_rows(const Flux2SingleBlock& block, const mx::array& h, const mx::array& n,
                              const std::vector<mx::array>& mod, const Flux2Rope& rope, int first, int end) const;
  // Joint attention over q, k (normed and rotated) and v, each [B, T, H, D] -> [B, T, H * D].
  mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v) const;
  // The blocks from double block `first` on -> the first `kept` image tokens after the last single block.
  mx::array blocks_from(size_t first, mx::array x, mx::array ctx, const std::vector<mx::array>& mod_img,
                        const std::vector<mx::array>& mod_txt, const std::vector<mx::array>& mod_single,
                        const Flux2Rope& rope, EvalQueue* queue, int kept) const;

  Flux2Config config_;
  std::vector<std::vector<double>> inv_freq_;  // per axis, float64
  Linear t_linear_1_, t_linear_2_;
  Linear mod_img_, mod_txt_, mod_single_;
  Linear x_embedder_, context_embedder_;
  std::vector<Flux2DoubleBlock> double_blocks_;
  std::vector<Flux2SingleBlock> single_blocks_;
  Linear norm_out_, proj_out_;
};

// The Klein sampling loop over packed latents.
//   latents     float32 [1, Li, C]: the packed initial noise;
//   latent_ids  the noise tokens' ids (0, y, x, 0);
//   prompt      [1, T, joint_dim] text embedding (text ids (0, 0, 0, l));
//   negative    the unconditional text embedding: true CFG when given, as diffusers' base Klein
//               runs it: two batch-1 calls per step, v = v_neg + guidance * (v_pos - v_neg);
//   references  packed reference-image tokens [1, Lr, C] with their ids (10 (k + 1), y, x, 0):
//               appended after the noise in every call, their outputs dropped.
// The timestep is quantised as diffusers does: t = sigma * 1000 (float32) cast to the model dtype,
// / 1000 there, x 1000 inside the model. A step cache keeps the conditional (branch 0) and
// unconditional (branch 1) calls apart, as diffusers' cache contexts "cond" and "uncond" do.
// Returns the final packed latents (float32), or nullopt when cancelled.
std::optional<mx::array> flux2_denoise(const Flux2Transformer& model, const mx::array& latents,
                                       const std::vector<Flux2Id>& latent_ids, const std::vector<float>& sigmas,
                                       const mx::array& prompt, const std::optional<mx::array>& negative,
                                       float guidance, const std::optional<mx::array>& references,
                                       const std::vector<Flux2Id>& reference_ids, const DenoiseControl& control);

// Diffusers' compute_empirical_mu: the dynamic-shift mu for `image_seq_len` noise tokens and N steps.
double flux2_empirical_mu(int image_seq_len, int num_steps);

}  // namespace mlxr
