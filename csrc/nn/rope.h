// Rotary position embeddings with the scalings Hugging Face configs name (rope_scaling).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "nn/config_fields.h"
#include "nn/cuda_norm_rope.h"
#include "nn/weights.h"

namespace mlxr {

// A decoder's RoPE: rope_theta and transformers' rope_parameters (rope_scaling in 4.x configs), whose
// key names these fields take. Defaults: no scaling, as transformers without rope_parameters; the
// llama3 values are Llama 3.1's (transformers requires them in a llama3 config); the YaRN values are
// transformers' (original_max_position_embeddings, which transformers takes from the model's
// max_position_embeddings when the scaling leaves it out, must then be given).
struct RopeConfig {
  int dims = 0;                       // rotated dimensions; 0: the whole head (Llama/Qwen)
  bool traditional = false;           // false: rotate halves (HF's rotate_half), true: interleaved pairs
  float rope_theta = 10000.0f;        // the base
  std::string rope_type = "default";  // default | linear | llama3 | yarn
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position_embeddings = 8192;
  // YaRN (GPT-OSS, Qwen3 long context, DeepSeek): the band between beta_slow and beta_fast rotations
  // over the original context blends interpolated and original frequencies; attention_factor scales
  // cos/sin (0: derived from factor, mscale and mscale_all_dim as transformers does).
  float beta_fast = 32.0f;
  float beta_slow = 1.0f;
  float mscale = 0.0f;
  float mscale_all_dim = 0.0f;
  float attention_factor = 0.0f;
  bool truncate = true;  // round the blend band's ends outwards to whole dimensions

  MLXR_CONFIG_FIELDS(RopeConfig, dims, traditional, rope_theta, rope_type, factor, low_freq_factor, high_freq_factor,
                     original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor,
                     truncate)
};

// DeepSeek-style YaRN (a scaling that names mscale_all_dim: DeepSeek-V3, GLM-4.7-Flash) also scales the
// attention logits, by (0.1 mscale_all_dim ln(factor) + 1)^2 (transformers' yarn_apply_mscale); 1 otherwise.
float yarn_softmax_scale(const RopeConfig& config);

class Rope {
 public:
  // `config.dims` must be set (not 0).
  explicit Rope(const RopeConfig& config);
  // x: [B, H, T, D]; positions start at `offset`.
  mx::array operator()(const mx::array& x, int offset) const;
  // The same with a position per batch row: `offsets` int32 [B] (sequences of different lengths
  // decoded together, text/batch.h).
  mx::array operator()(const mx::array& x, const mx::array& offsets) const;
  // The rotation as the fused q/k kernel takes it (nn/cuda_norm_rope.h); nullopt when that kernel cannot do it
  // (a YaRN attention factor scales the rotated dimensions).
  const std::optional<FusedRope>& fused() const { return fused_; }

 private:
  template <typename Offset>
  mx::array rotate(const mx::array& x, const Offset& offset) const;

  RopeConfig config_;
  float scale_ = 1.0f;
  std::optional<mx::array> periods_;  // llama3, yarn: per-pair wavelength divisors, computed in double
  float attention_factor_ = 1.0f;     // yarn: cos and sin scaled by this
  std::optional<FusedRope> fused_;
};

// Multi-axis RoPE of the diffusion transformers (Z-Image: 3 axes, FLUX.2: 4): every token has
// one position per axis, and each axis owns a slice of the head dim. The angles come from a
// host-built table because MLX's fast::rope takes a single offset, not per-token multi-axis ids.

// cos/sin of the angle of every (token, pair): [B, T, 1, head_dim / 2], float32; and the same as
// the factors of each pair's two slots, [B, T, 1, head_dim / 2, 2]: (cos, sin) for x0 and (-sin,
// cos) for x1, so that RoPE is out = x0 * with_x0 + x1 * with_x1, element-wise (see apply_rope_pairs).
struct RopeTable {
  mx::array cos, sin, with_x0, with_x1;
};

// The table for these cos/sin values ([B, T, 1, head_dim / 2], float32).
RopeTable make_rope_table(const mx::array& cos, const mx::array& sin);

// Per axis of dim d: the inverse frequencies 1 / theta^(2k / d), k < d / 2, in float64 as
// diffusers computes them.
std::vector<std::vector<double>> axis_inverse_frequencies(const std::vector<int>& axes_dims, double theta);

// RoPE on interleaved pairs (x[2k], x[2k+1]) -> (x0 cos - x1 sin, x0 sin + x1 cos), in float32,
// cast back to x's dtype. x: [B, T, H, D]. One fused kernel on a GPU.
mx::array apply_rope_pairs(const mx::array& x, const RopeTable& rope);

}  // namespace mlxr
