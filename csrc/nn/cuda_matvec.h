// Decode-sized products with packed weights on CUDA: x W^T for a few rows of x (a token per sequence).
//
// At one row MLX 0.32.4's CUDA backend sends a 4-bit weight taller or wider than 16,384 to its tiled
// matrix-matrix kernel (an LM head, a fused gate|up projection), and its matrix-vector kernel loads 8
// bytes a lane and sums in bfloat16; a decode step is nothing but such products, so their bandwidth is
// the token rate. Ours reads 16 bytes a lane, splits each row between several warps and sums in float
// (benchmarks/README.md has the figures against MLX's). Float weights keep MLX's products, which run at
// the copy bandwidth there already.
#pragma once

#include <optional>

#include "nn/weights.h"

namespace mlxr {

// The most rows of x the kernel takes: from 8 rows on MLX's tiled kernel is faster (measured on an H200);
// below, MLX's matrix-vector kernel runs, at a third of ours.
constexpr int kMaxMatvecRows = 7;

// x W^T with W [N, K] packed affine 4/8-bit in groups of 32/64/128, its scales and biases in x's dtype
// (bfloat16/float16); x [..., K] with at most kMaxMatvecRows rows. nullopt when not on CUDA or the case is
// not one of those: the caller uses MLX's own product.
std::optional<mx::array> cuda_quantized_matvec(const mx::array& x, const mx::array& packed, const Quantized& q);

}  // namespace mlxr
