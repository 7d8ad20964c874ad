#include "nn/conv.h"

namespace mlxr {

Conv2d Conv2d::load(const Weights& w, int in_channels, int out_channels, int kernel, int stride, int padding) {
  auto torch_layout = w.get("weight", {out_channels, in_channels, kernel, kernel});
  // A real copy, made once: conv kernels want the weight contiguous in MLX's layout.
  auto weight = mx::contiguous(mx::transpose(torch_layout, {0, 2, 3, 1}));
  mx::eval(weight);
  return Conv2d{weight, w.maybe("bias", {out_channels}), stride, padding < 0 ? kernel / 2 : padding};
}

mx::array Conv2d::operator()(const mx::array& x) const {
  auto y = mx::conv2d(x, weight, {stride, stride}, {padding, padding});
  return bias ? mx::add(y, *bias) : y;
}

GroupNorm GroupNorm::load(const Weights& w, int channels, int groups, float eps) {
  if (groups <= 0 || channels % groups != 0) {
    throw std::invalid_argument(w.full_name("weight") + ": " + std::to_string(channels) +
                                " channels do not split into " + std::to_string(groups) + " groups");
  }
  return GroupNorm{w.get("weight", {channels}), w.get("bias", {channels}), groups, eps};
}

mx::array GroupNorm::operator()(const mx::array& x) const {
  const int b = x.shape(0), h = x.shape(1), wd = x.shape(2), c = x.shape(3);
  auto xf = mx::reshape(mx::astype(x, mx::float32), {b, h * wd, groups, c / groups});
  auto mean = mx::mean(xf, std::vector<int>{1, 3}, /*keepdims=*/true);
  auto centred = mx::subtract(xf, mean);
  auto var = mx::mean(mx::square(centred), std::vector<int>{1, 3}, true);
  auto normed = mx::multiply(centred, mx::rsqrt(mx::add(var, mx::array(eps))));
  normed = mx::reshape(normed, {b, h, wd, c});
  auto y = mx::add(mx::multiply(normed, mx::astype(weight, mx::float32)), mx::astype(bias, mx::float32));
  return mx::astype(y, x.dtype());
}

mx::array upsample_nearest_2x(const mx::array& x) {
  const int b = x.shape(0), h = x.shape(1), w = x.shape(2), c = x.shape(3);
  auto y = mx::broadcast_to(mx::reshape(x, {b, h, 1, w, 1, c}), {b, h, 2, w, 2, c});
  return mx::reshape(y, {b, 2 * h, 2 * w, c});
}

mx::array silu(const mx::array& x) {
  return mx::multiply(x, mx::sigmoid(x));
}

}  // namespace mlxr
