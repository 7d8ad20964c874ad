#include "nn/rope.h"

#include <cmath>
#include <stdexcept>
#include <vector>

namespace mlxr {

namespace {

// Llama 3's frequency-dependent scaling (transformers' _compute_llama3_parameters), as the
// "freqs" MLX's fast::rope takes: per pair, the inverse of the angular frequency.
mx::array llama3_periods(const RopeConfig& c) {
  const double low_wavelen = c.original_max_position / c.low_freq_factor;
  const double high_wavelen = c.original_max_position / c.high_freq_factor;
  std::vector<float> periods;
  for (int i = 0; i < c.dims; i += 2) {
    const double period = std::pow(static_cast<double>(c.base), static_cast<double>(i) / c.dims);
    const double wavelen = 2.0 * M_PI * period;
    double scaled = period;
    if (wavelen > low_wavelen) {
      scaled = period * c.factor;  // low frequencies: fully interpolated
    } else if (wavelen > high_wavelen) {
      // medium: blend between interpolated and original
      const double smooth = (c.original_max_position / wavelen - c.low_freq_factor) /
                            (c.high_freq_factor - c.low_freq_factor);
      scaled = period / ((1.0 - smooth) / c.factor + smooth);
    }
    periods.push_back(static_cast<float>(scaled));
  }
  return mx::array(periods.data(), {static_cast<int>(periods.size())}, mx::float32);
}

}  // namespace

Rope::Rope(const RopeConfig& config) : config_(config) {
  if (config.type == "default") {
  } else if (config.type == "linear") {
    scale_ = 1.0f / config.factor;
  } else if (config.type == "llama3") {
    periods_ = llama3_periods(config);
  } else {
    throw std::invalid_argument("unsupported rope_scaling type '" + config.type +
                                "' (supported: default, linear, llama3)");
  }
}

mx::array Rope::operator()(const mx::array& x, int offset) const {
  if (periods_) {
    return mx::fast::rope(x, config_.dims, config_.traditional, std::nullopt, 1.0f, offset, *periods_);
  }
  return mx::fast::rope(x, config_.dims, config_.traditional, config_.base, scale_, offset);
}

std::vector<std::vector<double>> axis_inverse_frequencies(const std::vector<int>& axes_dims, double theta) {
  std::vector<std::vector<double>> out;
  for (int d : axes_dims) {
    std::vector<double> inv(d / 2);
    for (int k = 0; k < d / 2; ++k) inv[k] = 1.0 / std::pow(theta, (2.0 * k) / d);
    out.push_back(std::move(inv));
  }
  return out;
}

mx::array apply_rope_pairs(const mx::array& x, const RopeTable& rope) {
  const auto shape = x.shape();
  auto pairs = mx::reshape(mx::astype(x, mx::float32), {shape[0], shape[1], shape[2], shape[3] / 2, 2});
  auto parts = mx::split(pairs, 2, -1);
  auto x0 = mx::squeeze(parts[0], -1), x1 = mx::squeeze(parts[1], -1);
  auto out0 = mx::subtract(mx::multiply(x0, rope.cos), mx::multiply(x1, rope.sin));
  auto out1 = mx::add(mx::multiply(x0, rope.sin), mx::multiply(x1, rope.cos));
  return mx::astype(mx::reshape(mx::stack({out0, out1}, -1), shape), x.dtype());
}

}  // namespace mlxr
