#include "nn/rope.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "nn/cuda_kernel_common.h"
#include "nn/fusion.h"

namespace mlxr {

namespace {

// Llama 3's frequency-dependent scaling (transformers' _compute_llama3_parameters), as the
// "freqs" MLX's fast::rope takes: per pair, the inverse of the angular frequency.
std::vector<float> llama3_periods(const RopeConfig& c) {
  const double low_wavelen = c.original_max_position_embeddings / c.low_freq_factor;
  const double high_wavelen = c.original_max_position_embeddings / c.high_freq_factor;
  std::vector<float> periods;
  for (int i = 0; i < c.dims; i += 2) {
    const double period = std::pow(static_cast<double>(c.rope_theta), static_cast<double>(i) / c.dims);
    const double wavelen = 2.0 * M_PI * period;
    double scaled = period;
    if (wavelen > low_wavelen) {
      scaled = period * c.factor;  // low frequencies: fully interpolated
    } else if (wavelen > high_wavelen) {
      // medium: blend between interpolated and original
      const double smooth =
          (c.original_max_position_embeddings / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor);
      scaled = period / ((1.0 - smooth) / c.factor + smooth);
    }
    periods.push_back(static_cast<float>(scaled));
  }
  return periods;
}

// YaRN (transformers' _compute_yarn_parameters): per pair, the inverse frequency blends the
// interpolated (divided by factor) and the original one by a linear ramp over the dimensions whose
// wavelength falls between beta_fast and beta_slow rotations of the original context; as periods.
std::vector<float> yarn_periods(const RopeConfig& c) {
  const double base = c.rope_theta, dims = c.dims;
  auto correction_dim = [&](double rotations) {
    return dims * std::log(c.original_max_position_embeddings / (rotations * 2.0 * M_PI)) / (2.0 * std::log(base));
  };
  double low = correction_dim(c.beta_fast), high = correction_dim(c.beta_slow);
  if (c.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, dims - 1);
  if (low == high) high += 0.001;  // as transformers: no division by zero
  std::vector<float> periods;
  for (int i = 0; i < c.dims / 2; ++i) {
    const double period = std::pow(base, 2.0 * i / dims);
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double extrapolation = 1.0 - ramp;  // the share of the original frequency
    const double inverse = (1.0 / (c.factor * period)) * (1.0 - extrapolation) + (1.0 / period) * extrapolation;
    periods.push_back(static_cast<float>(1.0 / inverse));
  }
  return periods;
}

// Per rotated pair, the angle one position turns it by: scale / theta^(2i / dims), or scale / period where a
// scaling gives the periods; in double, rounded once.
mx::array inverse_frequencies(const RopeConfig& c, float scale, const std::vector<float>& periods) {
  std::vector<float> inverse(c.dims / 2);
  if (!periods.empty()) {
    for (int i = 0; i < c.dims / 2; ++i) inverse[i] = static_cast<float>(scale / static_cast<double>(periods[i]));
  } else {
    for (int i = 0; i < c.dims / 2; ++i) {
      inverse[i] = static_cast<float>(scale / std::pow(static_cast<double>(c.rope_theta), 2.0 * i / c.dims));
    }
  }
  return mx::array(inverse.data(), {c.dims / 2}, mx::float32);
}

double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

float yarn_attention_factor(const RopeConfig& c) {
  if (c.attention_factor > 0.0f) return c.attention_factor;
  if (c.mscale != 0.0f && c.mscale_all_dim != 0.0f) {
    return static_cast<float>(yarn_mscale(c.factor, c.mscale) / yarn_mscale(c.factor, c.mscale_all_dim));
  }
  return static_cast<float>(yarn_mscale(c.factor, 1.0));
}

}  // namespace

float yarn_softmax_scale(const RopeConfig& c) {
  if (c.rope_type == "default" || c.mscale_all_dim == 0.0f) return 1.0f;
  const double mscale = yarn_mscale(c.factor, c.mscale_all_dim);
  return static_cast<float>(mscale * mscale);
}

Rope::Rope(const RopeConfig& config) : config_(config) {
  if (config.dims <= 0) throw std::invalid_argument("RoPE: dims must be positive");
  std::vector<float> periods;  // llama3, yarn
  if (config.rope_type == "default") {
  } else if (config.rope_type == "linear") {
    scale_ = 1.0f / config.factor;
  } else if (config.rope_type == "llama3") {
    periods = llama3_periods(config);
  } else if (config.rope_type == "yarn") {
    periods = yarn_periods(config);
    attention_factor_ = yarn_attention_factor(config);
  } else {
    throw std::invalid_argument("unsupported rope_scaling type '" + config.rope_type +
                                "' (supported: default, linear, llama3, yarn)");
  }
  if (!periods.empty()) periods_ = mx::array(periods.data(), {static_cast<int>(periods.size())}, mx::float32);
  if (attention_factor_ == 1.0f && config.dims % 2 == 0) {
    fused_ = FusedRope{.inverse_frequencies = inverse_frequencies(config, scale_, periods),
                       .traditional = config.traditional};
  }
}

template <typename Offset>
mx::array Rope::rotate(const mx::array& x, const Offset& offset) const {
  if (!periods_) return mx::fast::rope(x, config_.dims, config_.traditional, config_.rope_theta, scale_, offset);
  auto rotated = mx::fast::rope(x, config_.dims, config_.traditional, std::nullopt, 1.0f, offset, *periods_);
  if (attention_factor_ == 1.0f) return rotated;
  // Scaling cos and sin scales the rotated dimensions (RoPE is linear in them); the rest stay as they are.
  const int d = x.shape(-1);
  auto factor = mx::array(attention_factor_, x.dtype());
  if (config_.dims == d) return mx::multiply(rotated, factor);
  auto shape = x.shape();
  auto stop = shape;
  stop.back() = config_.dims;
  auto start = mx::Shape(shape.size(), 0);
  auto head = mx::multiply(mx::slice(rotated, start, stop), factor);
  start.back() = config_.dims;
  return mx::concatenate({head, mx::slice(rotated, start, shape)}, -1);
}

mx::array Rope::operator()(const mx::array& x, int offset) const {
  return rotate(x, offset);
}

mx::array Rope::operator()(const mx::array& x, const mx::array& offsets) const {
  return rotate(x, offsets);
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

RopeTable make_rope_table(const mx::array& cos, const mx::array& sin) {
  return RopeTable{
      .cos = cos, .sin = sin, .with_x0 = mx::stack({cos, sin}, -1), .with_x1 = mx::stack({mx::negative(sin), cos}, -1)};
}

namespace {

// in: x0, x1 ([B, T, H, D/2, 1] views of x's even and odd elements), with_x0, with_x1. Every op is
// element-wise (x0 and x1 broadcast over a pair's two slots), so mx::compile makes it one kernel
// (Metal; MLXRUNNER_FUSE_ON_CPU): unfused, a 1024^2 Z-Image step on an H200 spent 29 of its 130 ms on
// RoPE's float32 copies, stack and multiplies. x0 * cos + x1 * (-sin) is x0 * cos - x1 * sin exactly.
std::vector<mx::array> rope_pairs_impl(const std::vector<mx::array>& in) {
  auto x0 = mx::astype(in[0], mx::float32), x1 = mx::astype(in[1], mx::float32);
  return {mx::astype(mx::add(mx::multiply(x0, in[2]), mx::multiply(x1, in[3])), in[0].dtype())};
}

// On CUDA, one thread per pair. The compiled kernel above reads x through strided, broadcast 5-D
// views, and MLX's generated kernel for those ran at ~0.5 TB/s (8.8 ms a Z-Image step, H200); this
// reads and writes x contiguously. x: [B, T, H, D] row-contiguous; cos/sin: [1 or B, T, 1, D/2] float32.
constexpr const char* kRopePairsCuda = R"(
  const int batch = x_shape[0], tokens = x_shape[1], heads = x_shape[2], half = x_shape[3] / 2;
  const long long pairs = static_cast<long long>(batch) * tokens * heads * half;
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const long long token = i / half / heads;  // b * tokens + t
  const long long table_row = cos_table_shape[0] == 1 ? token % tokens : token;
  const long long at = table_row * half + i % half;
  const float c = cos_table[at], s = sin_table[at];
  const float x0 = static_cast<float>(x[2 * i]), x1 = static_cast<float>(x[2 * i + 1]);
  out[2 * i] = static_cast<DT>(x0 * c - x1 * s);
  out[2 * i + 1] = static_cast<DT>(x0 * s + x1 * c);
)";

mx::array rope_pairs_cuda(const mx::array& x, const RopeTable& rope) {
  static auto kernel = cuda_kernel("mlxr_rope_pairs", {"x", "cos_table", "sin_table"}, {"out"}, kRopePairsCuda, "",
                                   /*ensure_row_contiguous=*/true);
  const auto& shape = x.shape();
  const long long pairs = static_cast<long long>(x.size()) / 2;
  if (pairs > std::numeric_limits<int>::max()) throw std::invalid_argument("RoPE: tensor too large");
  return kernel({x, rope.cos, rope.sin}, {shape}, {x.dtype()}, {static_cast<int>(pairs), 1, 1}, {256, 1, 1},
                {{"DT", x.dtype()}}, std::nullopt, false, {})[0];
}

}  // namespace

mx::array apply_rope_pairs(const mx::array& x, const RopeTable& rope) {
  if (running_on_cuda()) return rope_pairs_cuda(x, rope);
  static auto fused = mx::compile(rope_pairs_impl, /*shapeless=*/true);
  const auto shape = x.shape();
  const int b = shape[0], t = shape[1], h = shape[2], half = shape[3] / 2;
  auto pairs = mx::reshape(x, {b, t, h, half, 2});
  auto x0 = mx::slice(pairs, {0, 0, 0, 0, 0}, {b, t, h, half, 1});
  auto x1 = mx::slice(pairs, {0, 0, 0, 0, 1}, {b, t, h, half, 2});
  return mx::reshape(run_fused(fused, rope_pairs_impl, {x0, x1, rope.with_x0, rope.with_x1}), shape);
}

}  // namespace mlxr
