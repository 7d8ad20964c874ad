// A short chunk's products on CUDA: x W^T for 9 to 64 rows of x (a chat's next turn after the prompt cache, a
// speculative or a batched chunk) and a half-precision W, on the tensor cores, in one operation of ours.
//
// Why not MLX's product: MLX 0.32.4 hands such a product to cuBLASLt, which plans it anew at every call and is
// launched into MLX's CUDA graph through a stream capture. On an H100 that costs the host ~21 us a product against
// ~6 us for one of our kernels (benchmarks/README.md, sessions 27 and 33), and the prompt cache's follow-up (64 tokens
// over 3,000 cached on a Qwen3-4B shape) is bound by the host: four products a layer, 144 a request. cuBLAS's device
// time is the bar the kernel has to meet (2.0-2.6 TB/s at 64 rows); session 28's first such kernel read its tensor
// cores' operands from shared memory a word at a time and lost. This one loads them with ldmatrix, streams W through
// a four-stage cp.async pipeline (64 of K a stage) and splits K over blocks where a product has too few 64-row tiles of
// W to fill the GPU (the partial sums added in a fixed order by the tile's last block, so a result does not depend on
// timing).
//
// A gated variant takes the fused gate|up weight of a gated MLP and writes silu(gate) * up (rounded as the product
// and then MLX's element-wise functors would round them): the separate gated SiLU operation goes too.
#pragma once

#include <mutex>
#include <optional>

#include "nn/weights.h"

namespace mlxr {

// A weight's per-tile counters for its split products, handed from one product to the next. Each product's last
// block of a tile counts the tile's finished splits on the counters it was given and writes a zero for the tile into
// a fresh array, its output, which the weight's next product is given: that output makes MLX order the two products
// (its CUDA graph orders kernels only by the buffers they write and read), so two products of one weight never
// share counters while both run, even in one graph of independent chains (a prompt and its negative encoded
// together). The first product's counters are a lazy zeros array. One per Linear (nn/linear.h), shared by its copies.
class RowsProductCounters {
 public:
  // The counters for a product of `tiles` tiles (a lazy zeros array where none were handed on for that many).
  mx::array take(int tiles);
  void hand_on(mx::array next);

 private:
  std::mutex guard_;
  std::optional<mx::array> next_;
};

// The rows of x the kernel takes: above the decode kernels' few (nn/cuda_matvec.h), up to one tile of 64.
constexpr int kRowsProductFewest = 9;
constexpr int kRowsProductMost = 64;

// x W^T for x [..., K] (9..64 rows) and W [N, K] in x's half-precision dtype, one dense block, K a multiple of 64 and N
// of 128. nullopt when not on CUDA or the case is not one of those: the caller takes MLX's product.
std::optional<mx::array> cuda_rows_product(const mx::array& x, const mx::array& w, RowsProductCounters& counters);

// silu(x G^T) * (x U^T) for W = [G; U] ([2 I, K], gate rows first, as GatedMLP's fused gate_up_proj holds them), I a
// multiple of 64: [..., I]. The same cases as cuda_rows_product.
std::optional<mx::array> cuda_rows_swiglu(const mx::array& x, const mx::array& w, RowsProductCounters& counters);

// Whether the decoder's products of W take the kernel: the measuring switch MLXRUNNER_ROWS_PRODUCT, off unless set;
// "1" every product it takes, "gated" the gated MLP's alone, "small" those of weights of up to 16 M elements (a 4B
// layer's q|k|v and o). Session 35 timed it on all four products of a layer and on gate|up alone: slower (the device
// ~40 µs a layer more). Session 36 found the prompt cache's follow-up host-bound with >= 20 µs a layer of device slack,
// where the two small products cost cuBLAS's host ~21 µs each: "small" is that case, not yet timed.
bool rows_product_switched_on(const mx::array& w, bool gated);

// How many blocks the K dimension of a product of `tiles` 128-row tiles of W (gated: 64 outputs) and `k_steps` steps
// of 64 is split over.
int rows_product_splits(int tiles, int k_steps);

}  // namespace mlxr
