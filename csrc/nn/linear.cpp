#include "nn/linear.h"

#include <stdexcept>

namespace mlxr {

Linear Linear::load(const Weights& w, int in_features, int out_features, bool with_bias) {
  return Linear{.weight = w.get("weight", {out_features, in_features}),
                .bias = with_bias ? std::optional<mx::array>(w.get("bias", {out_features})) : std::nullopt};
}

Linear Linear::concat(const std::vector<Linear>& parts) {
  std::vector<mx::array> weights, biases;
  for (const auto& part : parts) {
    weights.push_back(part.weight);
    if (part.bias) biases.push_back(*part.bias);
  }
  if (!biases.empty() && biases.size() != parts.size()) {
    throw std::invalid_argument("Linear::concat: some parts have a bias and some do not");
  }
  return Linear{.weight = mx::concatenate(weights, 0),
                .bias = biases.empty() ? std::nullopt : std::optional<mx::array>(mx::concatenate(biases, 0))};
}

mx::array Linear::operator()(const mx::array& x) const {
  // transpose is a view: matmul reads W with swapped strides, no copy of the weight.
  auto y = mx::matmul(x, mx::transpose(weight));
  return bias ? mx::add(y, *bias) : y;
}

Embedding Embedding::load(const Weights& w, int num_embeddings, int dims) {
  return Embedding{w.get("weight", {num_embeddings, dims})};
}

mx::array Embedding::operator()(const mx::array& ids) const {
  return mx::take(weight, ids, 0);
}

}  // namespace mlxr
