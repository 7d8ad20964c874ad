#include "nn/activation.h"

#include <cmath>
#include <stdexcept>

#include "nn/cpu_kernels.h"
#include "nn/cuda_norm_rope.h"
#include "nn/fusion.h"
#include "nn/slicing.h"

namespace mlxr {

namespace {

// erf by kErfNumerator / kErfDenominator. Only multiplies, adds and one divide: on MLX's CPU backend
// transcendental ops run per element without vectorisation (mx::erf ~70x slower than a multiply),
// and erf made GELU the most expensive op of a BERT layer (benchmarks/README.md).
mx::array erf_rational(const mx::array& v) {
  auto c = [](double k) { return mx::array(static_cast<float>(k)); };
  auto x = mx::clip(v, c(-4.0), c(4.0));
  auto x2 = mx::square(x);
  auto horner = [&](const auto& coefficients) {
    auto acc = c(coefficients.front());
    for (size_t i = 1; i < coefficients.size(); ++i) acc = mx::add(mx::multiply(acc, x2), c(coefficients[i]));
    return acc;
  };
  return mx::divide(mx::multiply(x, horner(kErfNumerator)), horner(kErfDenominator));
}

std::vector<mx::array> silu_impl(const std::vector<mx::array>& in) {
  return {mx::multiply(in[0], mx::sigmoid(in[0]))};
}

std::vector<mx::array> gated_silu_impl(const std::vector<mx::array>& in) {
  return {mx::multiply(mx::multiply(in[0], mx::sigmoid(in[0])), in[1])};
}

}  // namespace

mx::array gelu(const mx::array& x) {
  if (on_cpu_kernels(x)) return gelu_erf_cpu(x);
  auto xf = mx::astype(x, mx::float32);
  auto y =
      mx::multiply(mx::multiply(xf, mx::array(0.5f)),
                   mx::add(mx::array(1.0f), erf_rational(mx::multiply(xf, mx::array(static_cast<float>(M_SQRT1_2))))));
  return mx::astype(y, x.dtype());
}

mx::array gelu_tanh(const mx::array& x) {
  const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
  auto dt = x.dtype();
  auto inner = mx::multiply(mx::array(k, dt),
                            mx::add(x, mx::multiply(mx::array(0.044715f, dt), mx::power(x, mx::array(3.0f, dt)))));
  return mx::multiply(mx::multiply(mx::array(0.5f, dt), x), mx::add(mx::array(1.0f, dt), mx::tanh(inner)));
}

bool is_known_activation(const std::string& name) {
  return name == "gelu" || name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "relu" || name == "silu" ||
         name == "swish";
}

mx::array activation(const std::string& name, const mx::array& x) {
  if (name == "gelu") return gelu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return gelu_tanh(x);
  if (name == "relu") return mx::maximum(x, mx::array(0.0f, x.dtype()));
  if (name == "silu" || name == "swish") return on_cpu_kernels(x) ? silu_cpu(x) : mx::multiply(x, mx::sigmoid(x));
  throw std::invalid_argument("unsupported activation '" + name + "'");
}

mx::array silu(const mx::array& x) {
  if (on_cpu_kernels(x) && !fuse_elementwise()) return silu_cpu(x);
  static auto fused = mx::compile(silu_impl, /*shapeless=*/true);
  return run_fused(fused, silu_impl, {x});
}

mx::array gated_silu(const mx::array& gate, const mx::array& up) {
  if (on_cpu_kernels(gate) && up.dtype() == gate.dtype() && up.shape() == gate.shape() && !fuse_elementwise()) {
    return gated_silu_cpu(gate, up);
  }
  static auto fused = mx::compile(gated_silu_impl, /*shapeless=*/true);
  return run_fused(fused, gated_silu_impl, {gate, up});
}

mx::array gated_silu_columns(const mx::array& fused, int gate_at, int up_at, int width) {
  if (on_cpu_kernels(fused) && !fuse_elementwise()) return gated_silu_columns_cpu(fused, gate_at, up_at, width);
  // On CUDA one kernel: the two slices and the compiled kernel were three operations for the host to encode.
  if (auto out = cuda_gated_silu_columns(fused, gate_at, up_at, width)) return *out;
  return gated_silu(axis_slice(fused, -1, gate_at, gate_at + width), axis_slice(fused, -1, up_at, up_at + width));
}

}  // namespace mlxr
