// The VAE's GroupNorm (+ SiLU) on CUDA in two kernels and a small sum.
//
// MLX's operations do a GroupNorm over an NHWC image as a float32 copy, two sums over the pixels, a fused
// (x - mean)^2 pass that writes float32 and a fused normalise pass: ~24 bytes moved per element and a dozen
// operations, where the statistics need one read (2 bytes of bfloat16) and the normalise one read and one write. On a
// 1024^2 decode that was a third of the VAE's kernel time on an H200 (benchmarks/README.md, "Profiles"). Here:
// 1. a sums kernel: each block reads a chunk of pixels of one image, 16 bytes a load, and writes per group the sum and
//    the sum of squares of (x - s), s the group's first value (pixel 0, its first channel): shifting by a value of
//    the group keeps the one-pass variance S2 / n - (S1 / n)^2 free of the cancellation that sums of raw squares
//    suffer when the mean is large against the spread;
// 2. mx::sum of the chunks' sums (a few thousand floats);
// 3. an apply kernel: (x - mean) * rsqrt(var + eps) * weight + bias in float32, SiLU when asked, rounded once to
//    x's dtype (the last pass of the operations it replaces, the same arithmetic).
// The chunks' sums are fixed by the shapes (no atomics): the same input gives the same bits on every run.
#pragma once

#include <optional>

#include "nn/norm.h"

namespace mlxr {

// GroupNorm of x [B, H, W, C] (bfloat16 or float16, C a multiple of 8 whose eighth divides 256: the VAE's 128, 256
// and 512 channels) with `norm`'s groups, weight and bias, then SiLU if then_silu. nullopt off CUDA, for other
// shapes or dtypes, or with MLXRUNNER_VAE_FUSION=0 (MLX's operations then run: for measuring what this gains).
std::optional<mx::array> cuda_group_norm(const mx::array& x, const GroupNorm& norm, bool then_silu);

}  // namespace mlxr
