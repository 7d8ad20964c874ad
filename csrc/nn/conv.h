// Convolution-network building blocks (images are NHWC inside MLX, as its conv2d expects).
#pragma once

#include "nn/weights.h"

namespace mlxr {

// 2-D convolution. Weights arrive in PyTorch's [out, in, kh, kw] layout and are stored in MLX's
// [out, kh, kw, in] once, at load.
struct Conv2d {
  mx::array weight;  // [O, kh, kw, I]
  std::optional<mx::array> bias;
  int stride = 1;
  int padding = 0;

  static Conv2d load(const Weights& w, int in_channels, int out_channels, int kernel, int stride = 1,
                     int padding = -1 /* -1: kernel / 2, "same" for odd kernels */);
  mx::array operator()(const mx::array& x) const;  // x: [B, H, W, I]
  // residual + conv(x), the bias and residual added in one fused pass on a GPU.
  mx::array operator()(const mx::array& x, const mx::array& residual) const;
  // conv(upsample_nearest_2x(x)); on the CPU without making the upsampled copy.
  mx::array upsampled_2x(const mx::array& x) const;
};

// Nearest-neighbour upsampling by 2 in H and W (torch's interpolate(scale_factor=2, "nearest")).
mx::array upsample_nearest_2x(const mx::array& x);

}  // namespace mlxr
