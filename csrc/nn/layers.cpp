#include "nn/layers.h"

#include <cmath>
#include <stdexcept>

namespace mlxr {

Linear Linear::load(const Weights& w, int in_features, int out_features, bool with_bias) {
  Linear layer{w.get("weight", {out_features, in_features}), std::nullopt};
  if (with_bias) {
    layer.bias = w.get("bias", {out_features});
  }
  return layer;
}

mx::array Linear::operator()(const mx::array& x) const {
  // transpose is a view: matmul reads W with swapped strides, no copy of the weight.
  auto y = mx::matmul(x, mx::transpose(weight));
  return bias ? mx::add(y, *bias) : y;
}

LayerNorm LayerNorm::load(const Weights& w, int dims, float eps) {
  return LayerNorm{w.get("weight", {dims}), w.get("bias", {dims}), eps};
}

mx::array LayerNorm::operator()(const mx::array& x) const {
  return mx::fast::layer_norm(x, weight, bias, eps);
}

Embedding Embedding::load(const Weights& w, int num_embeddings, int dims) {
  return Embedding{w.get("weight", {num_embeddings, dims})};
}

mx::array Embedding::operator()(const mx::array& ids) const {
  return mx::take(weight, ids, 0);
}

mx::array gelu(const mx::array& x) {
  auto half = mx::array(0.5f, x.dtype());
  auto inv_sqrt2 = mx::array(static_cast<float>(M_SQRT1_2), x.dtype());
  return mx::multiply(mx::multiply(x, half), mx::add(mx::array(1.0f, x.dtype()), mx::erf(mx::multiply(x, inv_sqrt2))));
}

mx::array gelu_tanh(const mx::array& x) {
  const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
  auto dt = x.dtype();
  auto inner = mx::multiply(
      mx::array(k, dt), mx::add(x, mx::multiply(mx::array(0.044715f, dt), mx::power(x, mx::array(3.0f, dt)))));
  return mx::multiply(mx::multiply(mx::array(0.5f, dt), x), mx::add(mx::array(1.0f, dt), mx::tanh(inner)));
}

bool is_known_activation(const std::string& name) {
  return name == "gelu" || name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "relu" ||
         name == "silu" || name == "swish";
}

mx::array activation(const std::string& name, const mx::array& x) {
  if (name == "gelu") return gelu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return gelu_tanh(x);
  if (name == "relu") return mx::maximum(x, mx::array(0.0f, x.dtype()));
  if (name == "silu" || name == "swish") return mx::multiply(x, mx::sigmoid(x));
  throw std::invalid_argument("unsupported activation '" + name + "'");
}

}  // namespace mlxr

namespace mlxr {

RMSNorm RMSNorm::load(const Weights& w, int dims, float eps) {
  return RMSNorm{w.get("weight", {dims}), eps};
}

mx::array RMSNorm::operator()(const mx::array& x) const {
  return mx::fast::rms_norm(x, weight, eps);
}

}  // namespace mlxr
