// Decode-sized products with packed weights on CUDA: x W^T for a few rows of x (a token per sequence).
//
// A decode step is nothing but such products, so their bandwidth is the token rate. Below 8 rows MLX
// 0.32.4 runs its matrix-vector kernel, which loads 8 bytes a lane, gives each row one warp and sums 4-bit
// products in bfloat16: 0.4-1.0 TB/s on an H200. Ours loads 16 bytes a lane, gives a warp four rows (the
// chunk of x it reads serves all four) and sums in float: up to 2.1 TB/s (benchmarks/README.md, "4-bit
// products"). Float weights keep MLX's products, which run at the copy bandwidth there already.
#pragma once

#include <optional>

#include "nn/weights.h"

namespace mlxr {

// The most rows of x the kernel takes: from 8 rows on MLX runs its tiled kernel, faster than ours there
// (measured on an H200); at 4-7 rows MLX's matrix-vector kernel runs at a third of ours.
constexpr int kMaxMatvecRows = 7;

// x W^T with W [N, K] packed affine 4/8-bit in groups of 32/64/128, its scales and biases in x's dtype
// (bfloat16/float16); x [..., K] with at most kMaxMatvecRows rows. nullopt when not on CUDA or the case is
// not one of those: the caller uses MLX's own product.
std::optional<mx::array> cuda_quantized_matvec(const mx::array& x, const mx::array& packed, const Quantized& q);

}  // namespace mlxr
