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

// The most bytes of im2col matrix (rows x columns x kernel area x channels) a CPU convolution builds at once: above
// it, it runs in bands. A band this small is written and read back by the matrix product while still in the
// CPU's caches, and its buffer comes back from malloc's free lists band after band (see mlxrunner/__init__.py:
// buffers above 32 MiB are fresh mappings, whose first touch costs a page fault per 4 KiB). A 256 x 256 x 64
// convolution took 107 ms in one piece, 44 ms in 4 MiB bands, its matrix product alone 41 ms. Bands also bound
// the side buffer: a VAE decode at 1024 x 1024 has 3x3 convolutions over 256 channels at full resolution, 9.7 GB
// of float32 im2col in one piece. (On CUDA, cuDNN's convolutions need no such buffer, and bands would only add
// the join's copy.)
constexpr int64_t kMaxConvPieceBytes = int64_t{4} << 20;

int band_rows_for(const mx::array& x, const mx::array& weight) {
  const int64_t kernel_area = int64_t{weight.shape(1)} * weight.shape(2);
  const int64_t row_bytes = int64_t{x.shape(0)} * x.shape(2) * x.shape(3) * kernel_area * x.itemsize();
  return static_cast<int>(std::max<int64_t>(1, kMaxConvPieceBytes / std::max<int64_t>(1, row_bytes)));
}

// On the CPU (float32, stride 1, a kernel wider than 1) a convolution is our multi-core im2col and one matrix
// product, the product MLX's own CPU convolution makes (cblas_sgemm on the same matrices: the same numbers), in
// bands when the im2col would be big.
mx::array convolve(const mx::array& x, const mx::array& weight, int stride, int padding) {
  if (stride == 1 && weight.shape(1) > 1 && on_cpu_kernels(x) && weight.dtype() == mx::float32) {
    return conv2d_in_bands(x, weight, padding, band_rows_for(x, weight));
  }
  return mx::conv2d(x, weight, {stride, stride}, {padding, padding});
}

// One band's rows, with `top` and `bottom` rows of zero padding and `padding` columns on each side.
mx::array convolve_rows(const mx::array& rows, const mx::array& weight, int top, int bottom, int padding) {
  if (!(on_cpu_kernels(rows) && weight.dtype() == mx::float32 && weight.shape(1) == weight.shape(2))) {
    return mx::conv_general(rows, weight, /*stride=*/{1, 1}, /*padding_lo=*/{top, padding},
                            /*padding_hi=*/{bottom, padding}, /*kernel_dilation=*/{1, 1}, /*input_dilation=*/{1, 1});
  }
  auto columns = im2col_cpu(rows, weight.shape(1), top, bottom, padding);  // [N, Ho, Wo, k * k * C]
  const int out_channels = weight.shape(0), depth = columns.shape(3);
  auto product =
      mx::matmul(mx::reshape(columns, {-1, depth}), mx::transpose(mx::reshape(weight, {out_channels, depth})));
  return mx::reshape(product, {columns.shape(0), columns.shape(1), columns.shape(2), out_channels});
}

// residual + (y + bias): a ResnetBlock's output in one pass instead of two.
std::vector<mx::array> add_bias_residual_impl(const std::vector<mx::array>& in) {
  return {mx::add(in[2], mx::add(in[0], in[1]))};
}

}  // namespace

mx::array Conv2d::operator()(const mx::array& x) const {
  auto y = convolve(x, weight, stride, padding);
  return bias ? mx::add(y, *bias) : y;
}

mx::array Conv2d::operator()(const mx::array& x, const mx::array& residual) const {
  static auto fused = mx::compile(add_bias_residual_impl, /*shapeless=*/true);
  auto y = convolve(x, weight, stride, padding);
  return bias ? run_fused(fused, add_bias_residual_impl, {y, *bias, residual}) : mx::add(residual, y);
}

mx::array conv2d_in_bands(const mx::array& x, const mx::array& weight, int padding, int band_rows) {
  const int batch = x.shape(0), height = x.shape(1), width = x.shape(2), channels = x.shape(3);
  const int out_rows = height + 2 * padding - weight.shape(1) + 1;
  std::vector<mx::array> bands;
  for (int first = 0; first < out_rows; first += band_rows) {
    const int last = std::min(out_rows, first + band_rows);  // output rows [first, last)
    // Input rows [first - padding, last - 1 - padding + kernel): the part inside the image, the rest padding.
    const int wanted_lo = first - padding, wanted_hi = last - 1 - padding + weight.shape(1);
    const int lo = std::max(0, wanted_lo), hi = std::min(height, wanted_hi);
    auto rows = mx::slice(x, {0, lo, 0, 0}, {batch, hi, width, channels});
    bands.push_back(convolve_rows(rows, weight, lo - wanted_lo, wanted_hi - hi, padding));
    if (last == out_rows && first == 0) return bands.back();  // one band: the plain convolution
    // Evaluated one by one: queued together, every band's side buffer would be alive until the whole
    // command stream completes, and the peak would not move.
    mx::eval(bands.back());
  }
  return mx::concatenate(bands, 1);
}

mx::array upsample_nearest_2x(const mx::array& x) {
  const int b = x.shape(0), h = x.shape(1), w = x.shape(2), c = x.shape(3);
  auto y = mx::broadcast_to(mx::reshape(x, {b, h, 1, w, 1, c}), {b, h, 2, w, 2, c});
  return mx::reshape(y, {b, 2 * h, 2 * w, c});
}

}  // namespace mlxr
