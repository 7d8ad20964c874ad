#include "nn/conv.h"

#include "nn/cpu_kernels.h"
#include "nn/fusion.h"

namespace mlxr {

Conv2d Conv2d::load(const Weights& w, int in_channels, int out_channels, int kernel, int stride, int padding) {
  auto torch_layout = w.get("weight", {out_channels, in_channels, kernel, kernel});
  // A real copy, made once: conv kernels want the weight contiguous in MLX's layout.
  auto weight = mx::contiguous(mx::transpose(torch_layout, {0, 2, 3, 1}));
  mx::eval(weight);
  return Conv2d{.weight = weight,
                .bias = w.maybe("bias", {out_channels}),
                .stride = stride,
                .padding = padding < 0 ? kernel / 2 : padding};
}

namespace {

// On the CPU (float32, stride 1, a kernel wider than 1) a convolution is our own primitive (nn/cpu_kernels.h), with
// its bias, residual and upsampling in the same pass: MLX's builds a side buffer 9x its input with one thread first.
bool on_cpu_conv(const Conv2d& conv, const mx::array& x) {
  return conv.stride == 1 && conv.weight.shape(1) > 1 && on_cpu_kernels(x) && conv.weight.dtype() == mx::float32 &&
         (!conv.bias || conv.bias->dtype() == mx::float32);
}

mx::array convolve(const Conv2d& conv, const mx::array& x) {
  const int out_channels = conv.weight.shape(0), in_channels = conv.weight.shape(3);
  if (conv.weight.shape(1) == 1 && conv.weight.shape(2) == 1 && conv.stride == 1 && conv.padding == 0) {
    // A 1x1 convolution is a product over the pixels: MLX's convolution would first copy its input (and on the CPU
    // hold ~2.5x its input's size more while it runs: 320 MiB for a VAE shortcut at 1024^2).
    auto pixels = mx::reshape(x, {-1, in_channels});
    auto y = mx::matmul(pixels, mx::transpose(mx::reshape(conv.weight, {out_channels, in_channels})));
    return mx::reshape(y, {x.shape(0), x.shape(1), x.shape(2), out_channels});
  }
  return mx::conv2d(x, conv.weight, {conv.stride, conv.stride}, {conv.padding, conv.padding});
}

// residual + (y + bias): a ResnetBlock's output in one pass instead of two.
std::vector<mx::array> add_bias_residual_impl(const std::vector<mx::array>& in) {
  return {mx::add(in[2], mx::add(in[0], in[1]))};
}

}  // namespace

mx::array Conv2d::operator()(const mx::array& x) const {
  if (on_cpu_conv(*this, x)) return conv2d_cpu(x, weight, padding, {.bias = bias});
  auto y = convolve(*this, x);
  return bias ? mx::add(y, *bias) : y;
}

mx::array Conv2d::operator()(const mx::array& x, const mx::array& residual) const {
  if (on_cpu_conv(*this, x) && residual.dtype() == mx::float32) {
    return conv2d_cpu(x, weight, padding, {.bias = bias, .residual = residual});
  }
  static auto fused = mx::compile(add_bias_residual_impl, /*shapeless=*/true);
  auto y = convolve(*this, x);
  return bias ? run_fused(fused, add_bias_residual_impl, {y, *bias, residual}) : mx::add(residual, y);
}

mx::array Conv2d::upsampled_2x(const mx::array& x) const {
  if (on_cpu_conv(*this, x)) return conv2d_cpu(x, weight, padding, {.bias = bias, .upsample_2x = true});
  return (*this)(upsample_nearest_2x(x));
}

mx::array upsample_nearest_2x(const mx::array& x) {
  const int b = x.shape(0), h = x.shape(1), w = x.shape(2), c = x.shape(3);
  auto y = mx::broadcast_to(mx::reshape(x, {b, h, 1, w, 1, c}), {b, h, 2, w, 2, c});
  return mx::reshape(y, {b, 2 * h, 2 * w, c});
}

}  // namespace mlxr
