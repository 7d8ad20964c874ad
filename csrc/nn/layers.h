// Small building blocks over mlx::core shared by every network.
#pragma once

#include "nn/weights.h"

namespace mlxr {

// y = x W^T + b, W stored as PyTorch does: [out_features, in_features].
struct Linear {
  mx::array weight;
  std::optional<mx::array> bias;

  static Linear load(const Weights& w, int in_features, int out_features, bool with_bias = true);
  // One layer computing `parts` side by side (outputs concatenated in order): one matmul instead
  // of several over the same input. The concatenation stays lazy until evaluated.
  static Linear concat(const std::vector<Linear>& parts);
  mx::array operator()(const mx::array& x) const;
  int out_features() const { return weight.shape(0); }
};

// LayerNorm over the last axis with learned scale and shift.
struct LayerNorm {
  mx::array weight;
  mx::array bias;
  float eps;

  static LayerNorm load(const Weights& w, int dims, float eps);
  mx::array operator()(const mx::array& x) const;
};

// Token / position lookup table: [num_embeddings, dims].
struct Embedding {
  mx::array weight;

  static Embedding load(const Weights& w, int num_embeddings, int dims);
  mx::array operator()(const mx::array& ids) const;
};

// GELU as PyTorch's default (exact, erf based): x * 0.5 * (1 + erf(x / sqrt(2))).
mx::array gelu(const mx::array& x);

// GELU with the tanh approximation ("gelu_new", "gelu_pytorch_tanh").
mx::array gelu_tanh(const mx::array& x);

// Activation by its Hugging Face config name (hidden_act); throws for an unknown name.
mx::array activation(const std::string& name, const mx::array& x);
bool is_known_activation(const std::string& name);

}  // namespace mlxr

namespace mlxr {

// RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight.
struct RMSNorm {
  mx::array weight;
  float eps;

  static RMSNorm load(const Weights& w, int dims, float eps);
  mx::array operator()(const mx::array& x) const;
};

}  // namespace mlxr
