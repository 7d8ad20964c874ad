#include "nn/norm.h"

#include <stdexcept>
#include <string>

#include "nn/cpu_kernels.h"
#include "nn/cuda_group_norm.h"
#include "nn/cuda_norm_rope.h"
#include "nn/fusion.h"

namespace mlxr {

LayerNorm LayerNorm::load(const Weights& w, int dims, float eps) {
  return LayerNorm{.weight = w.get("weight", {dims}), .bias = w.get("bias", {dims}), .eps = eps};
}

namespace {

// Whether a LayerNorm or RMSNorm of x takes the CPU kernel (nn/cpu_kernels.h): MLX's CPU runs its graph op by op.
bool norm_on_cpu_kernels(const mx::array& x, const mx::array& weight, const mx::array* bias) {
  return on_cpu_kernels(x) && x.ndim() >= 1 && weight.dtype() == mx::float32 && weight.ndim() == 1 &&
         weight.shape(0) == x.shape(-1) && (!bias || bias->dtype() == mx::float32 && bias->shape() == weight.shape());
}

}  // namespace

mx::array LayerNorm::operator()(const mx::array& x) const {
  if (norm_on_cpu_kernels(x, weight, &bias)) return layer_norm_cpu(x, weight, bias, eps);
  return mx::fast::layer_norm(x, weight, bias, eps);
}

RMSNorm RMSNorm::load(const Weights& w, int dims, float eps) {
  return RMSNorm{.weight = w.get("weight", {dims}), .eps = eps};
}

RMSNorm RMSNorm::load_one_plus(const Weights& w, int dims, float eps) {
  auto weight = w.get("weight", {dims});
  return RMSNorm{.weight = mx::add(weight, mx::array(1.0f, weight.dtype())), .eps = eps};
}

mx::array RMSNorm::operator()(const mx::array& x) const {
  if (norm_on_cpu_kernels(x, weight, nullptr)) return layer_norm_cpu(x, weight, std::nullopt, eps);
  return mx::fast::rms_norm(x, weight, eps);
}

std::pair<mx::array, mx::array> RMSNorm::add_then_norm(const mx::array& x, const mx::array& delta) const {
  if (auto fused = cuda_add_rms_norm(x, delta, weight, eps)) return *fused;
  auto sum = mx::add(x, delta);
  return {sum, (*this)(sum)};
}

GroupNorm GroupNorm::load(const Weights& w, int channels, int groups, float eps) {
  if (groups <= 0 || channels % groups != 0) {
    throw std::invalid_argument(w.full_name("weight") + ": " + std::to_string(channels) +
                                " channels do not split into " + std::to_string(groups) + " groups");
  }
  return GroupNorm{
      .weight = w.get("weight", {channels}), .bias = w.get("bias", {channels}), .groups = groups, .eps = eps};
}

namespace {

// (x - mean)^2 in float32: the variance's input. x: [B, HW, C] any float dtype, mean: [B, 1, C].
std::vector<mx::array> centred_square_impl(const std::vector<mx::array>& in) {
  return {mx::square(mx::subtract(mx::astype(in[0], mx::float32), in[1]))};
}

// (x - mean) * scale + shift in float32, back to x's dtype: GroupNorm's one full-size pass.
std::vector<mx::array> normalise_impl(const std::vector<mx::array>& in) {
  auto y = mx::add(mx::multiply(mx::subtract(mx::astype(in[0], mx::float32), in[1]), in[2]), in[3]);
  return {mx::astype(y, in[0].dtype())};
}

// The same with SiLU applied before the cast, as every VAE GroupNorm but the attention's is used.
std::vector<mx::array> normalise_silu_impl(const std::vector<mx::array>& in) {
  auto y = mx::add(mx::multiply(mx::subtract(mx::astype(in[0], mx::float32), in[1]), in[2]), in[3]);
  return {mx::astype(mx::multiply(y, mx::sigmoid(y)), in[0].dtype())};
}

}  // namespace

// Per-group statistics from per-channel sums over the pixels: each reduction runs over the
// pixel axis with one output per channel (contiguous, C-wide, split across the GPU), and only the
// C -> groups step is small. Reducing [B, HW, groups, C/groups] over axes {1, 3} directly, as this
// first did, leaves 32 outputs for millions of strided inputs: on MLX's CUDA backend that ran the
// Klein VAE decode at 1024 x 1024 in 7.6 s (diffusers: 0.09 s). Two passes (mean, then squared
// deviations) in float32, as PyTorch's GroupNorm is accurate to: the sums read float32 because
// MLX's CUDA reductions accumulate in the input dtype, and a bfloat16 sum over a million pixels
// would lose the mean. The statistics are tiny; the full-size work is one float32 copy, two
// sums, one fused (x - mean)^2 and one fused normalise (+ SiLU) pass writing the input dtype,
// instead of the ten separate float32 passes of the unfused graph (GPU). On the CPU, float32, it is one
// primitive on every core (nn/cpu_kernels.h): MLX's CPU reductions and element-wise ops run on one thread.
mx::array GroupNorm::operator()(const mx::array& x, bool then_silu) const {
  static auto centred_square = mx::compile(centred_square_impl, /*shapeless=*/true);
  static auto normalise = mx::compile(normalise_impl, /*shapeless=*/true);
  static auto normalise_silu = mx::compile(normalise_silu_impl, /*shapeless=*/true);
  if (on_cpu_kernels(x) && !fuse_elementwise()) return group_norm_cpu(x, weight, bias, groups, eps, then_silu);
  if (auto fused = cuda_group_norm(x, *this, then_silu)) return *fused;
  const int b = x.shape(0), h = x.shape(1), wd = x.shape(2), c = x.shape(3);
  const int per_group = c / groups;
  const float count = static_cast<float>(h) * wd * per_group;
  auto pixels = mx::reshape(x, {b, h * wd, c});
  // [B, C] per-channel sums -> [B, groups] -> back to one value per channel, [B, 1, C].
  auto group_mean_per_channel = [&](const mx::array& per_channel_sum) {
    auto g = mx::sum(mx::reshape(per_channel_sum, {b, groups, per_group}), -1, /*keepdims=*/true);
    g = mx::divide(g, mx::array(count));
    return mx::reshape(mx::broadcast_to(g, {b, groups, per_group}), {b, 1, c});
  };
  auto mean = group_mean_per_channel(mx::sum(mx::astype(pixels, mx::float32), 1));
  auto var = group_mean_per_channel(mx::sum(run_fused(centred_square, centred_square_impl, {pixels, mean}), 1));
  auto scale = mx::multiply(mx::rsqrt(mx::add(var, mx::array(eps))), mx::astype(weight, mx::float32));
  auto shift = mx::astype(bias, mx::float32);
  auto y = then_silu ? run_fused(normalise_silu, normalise_silu_impl, {pixels, mean, scale, shift})
                     : run_fused(normalise, normalise_impl, {pixels, mean, scale, shift});
  return mx::reshape(y, {b, h, wd, c});
}

}  // namespace mlxr
