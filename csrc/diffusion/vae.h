// AutoencoderKL (diffusers' Encoder / Decoder of the FLUX.1 VAE family, which Z-Image uses and
// FLUX.2's VAE extends). NHWC inside; the public entry points take and return NHWC arrays.
#pragma once

#include <functional>

#include <vector>

#include "nn/attention.h"
#include "nn/config_fields.h"
#include "nn/conv.h"
#include "nn/linear.h"
#include "nn/norm.h"

namespace mlxr {

// vae/config.json (AutoencoderKL); defaults as its __init__'s (diffusers 0.42.1). AutoencoderKLFlux2's
// configs share these keys (its BatchNorm and patch size are read in Python).
struct VaeConfig {
  int in_channels = 3;
  int out_channels = 3;
  int latent_channels = 4;
  std::vector<int> block_out_channels{64};
  int layers_per_block = 1;
  int norm_num_groups = 32;
  bool mid_block_add_attention = true;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;

  MLXR_CONFIG_FIELDS(VaeConfig, in_channels, out_channels, latent_channels, block_out_channels, layers_per_block,
                     norm_num_groups, mid_block_add_attention, use_quant_conv, use_post_quant_conv)
};

// diffusers' Encoder/Decoder hard-code their GroupNorm eps (Ollama's port used 1e-5).
constexpr float kVaeNormEps = 1e-6f;

// ResnetBlock2D: GN -> SiLU -> conv -> GN -> SiLU -> conv, plus the (1x1-projected) input.
struct ResnetBlock {
  GroupNorm norm1, norm2;
  Conv2d conv1, conv2;
  std::optional<Conv2d> conv_shortcut;

  static ResnetBlock load(const Weights& w, int in_channels, int out_channels, const VaeConfig& c);
  mx::array operator()(const mx::array& x) const;
};

// The mid-block's single-head self-attention over all pixels, in bands of queries with at most this many scores
// (64 MiB of float32) at a time: a 1024^2 image's 16,384 pixels in 16 bands instead of a 1 GiB score matrix (nn/
// attention.h). Sixteen small products cost nothing beside the decoder's convolutions.
constexpr size_t kVaeMaxAttentionScores = size_t{1} << 24;
struct VaeAttention {
  GroupNorm group_norm;
  AttentionProjections projections;

  static VaeAttention load(const Weights& w, int channels, const VaeConfig& c);
  mx::array operator()(const mx::array& x) const;
};

struct VaeMidBlock {
  ResnetBlock resnet0, resnet1;
  std::optional<VaeAttention> attention;

  static VaeMidBlock load(const Weights& w, int channels, const VaeConfig& c);
  mx::array operator()(const mx::array& x) const;
};

struct VaeUpBlock {
  std::vector<ResnetBlock> resnets;
  std::optional<Conv2d> upsampler;  // nearest x2, then 3x3 conv
};

struct VaeDownBlock {
  std::vector<ResnetBlock> resnets;
  std::optional<Conv2d> downsampler;  // pad right/bottom by 1, then 3x3 conv with stride 2
};

// Called between a VAE network's blocks (and tiles); it throws to stop the pass (a client that left).
using BetweenBlocks = std::function<void()>;

// diffusers' tiled_decode / _tiled_encode for either direction: `network` runs on overlapping tiles of `tile`
// input pixels a side, starting every tile * (1 - overlap_factor) pixels, each giving `out_tile` output pixels
// (x8 decoding, /8 encoding); each output tile fades in over overlap_factor * out_tile rows and columns from
// its upper and left neighbours (blended in place, as diffusers does) and keeps the rest up to the next start.
// One tile's activations at a time: that is what bounds memory at large sizes.
// diffusers' AutoencoderKL tile_overlap_factor: neighbouring tiles share a quarter of a tile.
constexpr float kTileOverlapFactor = 0.25f;

mx::array tiled_pass(const mx::array& x, int tile, int out_tile, float overlap_factor,
                     const std::function<mx::array(const mx::array&)>& network, const BetweenBlocks& between_blocks);

class VaeDecoder {
 public:
  // `weights` holds the VAE component's tensors (names as diffusers saves them: decoder.*, post_quant_conv.*).
  VaeDecoder(const VaeConfig& config, const WeightMap& weights);

  // Latents [B, h, w, latent_channels] (already unscaled) -> image [B, 8h, 8w, out_channels] in [-1, 1].
  // With `between_blocks`, each block is evaluated before it is called, so a stop lands within one
  // block rather than after the whole decode (a 1024² decode takes tens of seconds on a CPU).
  mx::array operator()(const mx::array& z, const BetweenBlocks& between_blocks = {}) const;

  // The same, decoded in overlapping tiles of `tile` latents blended linearly over `overlap`
  // latents' worth of pixels, as diffusers' AutoencoderKL.tiled_decode does. Bounds memory at large sizes.
  mx::array tiled(const mx::array& z, int tile, float overlap_factor = kTileOverlapFactor,
                  const BetweenBlocks& between_blocks = {}) const;

  const VaeConfig& config() const { return config_; }
  int scale_factor() const { return 1 << (config_.block_out_channels.size() - 1); }

 private:
  VaeConfig config_;
  std::optional<Conv2d> post_quant_conv_;
  Conv2d conv_in_;
  VaeMidBlock mid_;
  std::vector<VaeUpBlock> up_blocks_;
  GroupNorm norm_out_;
  Conv2d conv_out_;
};

class VaeEncoder {
 public:
  VaeEncoder(const VaeConfig& config, const WeightMap& weights);

  // Image [B, H, W, in_channels] in [-1, 1] -> the posterior's mean [B, H/8, W/8, latent_channels]
  // (its mode: what a deterministic encode uses). With `between_blocks`, each block is evaluated before it
  // is called, as the decoder's.
  mx::array operator()(const mx::array& x, const BetweenBlocks& between_blocks = {}) const;

  // The same, encoded in overlapping tiles of `tile` pixels (diffusers' AutoencoderKL._tiled_encode; `tile`
  // a multiple of the downsampling factor).
  mx::array tiled(const mx::array& x, int tile, float overlap_factor = kTileOverlapFactor,
                  const BetweenBlocks& between_blocks = {}) const;

  int scale_factor() const { return 1 << (config_.block_out_channels.size() - 1); }

  const VaeConfig& config() const { return config_; }

 private:
  VaeConfig config_;
  Conv2d conv_in_;
  std::vector<VaeDownBlock> down_blocks_;
  VaeMidBlock mid_;
  GroupNorm norm_out_;
  Conv2d conv_out_;
  std::optional<Conv2d> quant_conv_;
};

}  // namespace mlxr
