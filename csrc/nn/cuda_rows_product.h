// A short chunk's products with half-precision weights on CUDA: x W^T for 2 to 64 rows of x (the rest of a prompt
// after the prompt cache, a chat's next turn, a batch of 2 to 64 sequences).
//
// MLX 0.32 runs these through cuBLAS, planning every call anew (descriptors, a heuristic query) and capturing its
// launch into a graph of its own: in session 27's op_cost run on an H100 a 64-row product cost the host ~10 us more
// than a plain operation, and in the prompt cache's follow-up (a Qwen3-4B shape, 64 tokens) cuBLAS's four products a
// layer read their weights at 1.8-2.5 TB/s where the card copies at ~2.9 (3.47 of the request's 5.61 ms of kernels).
// This kernel is one custom kernel launch a product: a block takes 64 weight rows (16 a warp, mma.sync m16n8k16 with
// the weight as the A tile and up to eight 8-row tiles of x as B) through a four-stage cp.async pipeline of 64-column
// steps in dynamic shared memory; where the weight has too few 64-row tiles to fill the card, the blocks split K and the last block of a tile
// to finish sums the splits' float partials in split order (the same bits whichever block finishes last).
//
// A measuring switch: MLXRUNNER_ROWS_PRODUCT=1 sends the float products of 2-64 rows here (nn/linear.cpp); off unless
// set. Session 28's first GPU run (32-column steps in 40 KB of static shared memory) read weights at 0.5-1.7 TB/s
// where cuBLAS read 1.7-2.8: too few bytes in flight; hence the deeper stages.
#pragma once

#include <optional>

#include "nn/weights.h"

namespace mlxr {

// The most rows of x one launch takes: eight mma tiles of 8.
constexpr int kMaxRowsProductRows = 64;

// x W^T for W [N, K] and x [..., K] in one half-precision dtype, 2 to kMaxRowsProductRows rows of x, N a multiple of
// 64 and K of 64: float sums rounded once to x's dtype. nullopt when not on CUDA or the case is not one of those.
std::optional<mx::array> cuda_rows_product(const mx::array& x, const mx::array& w);

// The K splits the kernel takes for a weight of n rows and k columns (1: none), aiming at two blocks an SM of an H100
// (MLXRUNNER_ROWS_PRODUCT_BLOCKS=N, a measuring switch, aims at N blocks; benchmarks/gpu/rows_product_bench.py).
int rows_product_splits(int n, int k);

// Whether MLXRUNNER_ROWS_PRODUCT=1 (read once): the Linear layers' float products then try cuda_rows_product first.
bool rows_product_switched_on();

}  // namespace mlxr
