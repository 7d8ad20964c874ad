// Normalisation layers: LayerNorm and RMSNorm over the last axis, GroupNorm over NHWC images.
#pragma once

#include <utility>

#include "nn/weights.h"

namespace mlxr {

// LayerNorm over the last axis with learned scale and shift.
struct LayerNorm {
  mx::array weight;
  mx::array bias;
  float eps;

  static LayerNorm load(const Weights& w, int dims, float eps);
  mx::array operator()(const mx::array& x) const;
};

// RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight.
struct RMSNorm {
  mx::array weight;
  float eps;

  static RMSNorm load(const Weights& w, int dims, float eps);
  // Gemma's RMSNorm, which scales by (1 + weight) (its checkpoints store the offset from 1): the 1 is
  // added once here, in the weight's dtype, as mlx-lm does.
  static RMSNorm load_one_plus(const Weights& w, int dims, float eps);
  mx::array operator()(const mx::array& x) const;
  // (x + delta, the norm of that): a residual add and the norm after it, one kernel on CUDA.
  std::pair<mx::array, mx::array> add_then_norm(const mx::array& x, const mx::array& delta) const;
};

// GroupNorm as PyTorch computes it (statistics per sample and group over H, W and the group's
// channels; biased variance), in float32 whatever the input dtype; output in the input dtype.
// `then_silu` applies SiLU in the same pass (the VAE's norm -> SiLU pairs): fused on a GPU, one CPU primitive.
struct GroupNorm {
  mx::array weight;
  mx::array bias;
  int groups;
  float eps;

  static GroupNorm load(const Weights& w, int channels, int groups, float eps);
  mx::array operator()(const mx::array& x, bool then_silu = false) const;  // x: [B, H, W, C]
};

}  // namespace mlxr
