// Weight-matrix layers: fully connected (Linear) and lookup tables (Embedding).
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

// Token / position lookup table: [num_embeddings, dims].
struct Embedding {
  mx::array weight;

  static Embedding load(const Weights& w, int num_embeddings, int dims);
  mx::array operator()(const mx::array& ids) const;
};

}  // namespace mlxr
