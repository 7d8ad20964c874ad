// Decode-sized products with packed weights on CUDA: x W^T for a few rows of x (a token per sequence).
//
// A decode step is nothing but such products, so their bandwidth is the token rate. Below 8 rows MLX
// 0.32.4 runs its matrix-vector kernel, which loads 8 bytes a lane, gives each row one warp and sums 4-bit
// products in bfloat16: 0.4-1.0 TB/s on an H200, and a third of that at 4-7 rows. Ours unpacks two weights an
// instruction and multiplies 16-row tiles on the tensor cores, for up to 8 rows of x at the cost of one: up to
// 2.4 TB/s (benchmarks/README.md, "4-bit products"). Float weights keep MLX's products, which run at the copy
// bandwidth there already, unless MLXRUNNER_HALF_MATVEC=1 (a measuring switch) sends half-precision weights through
// the same kernels for the fusions below.
//
// A decode step is also bound by MLX's cost per operation on the host (~10-20 us each, several hundred a token), so
// two variants of the same kernel take on the work around a layer's products: the gated MLP's silu(gate) * up, and
// the residual add and RMSNorm before q|k|v and gate|up (11 operations a Qwen3/Llama layer -> 8).
#pragma once

#include <optional>

#include "nn/cuda_norm_rope.h"
#include "nn/weights.h"

namespace mlxr {

// The most rows of x the kernel takes (an mma's 8 columns): at 8 rows it beat MLX's tiled kernel by 1.2-1.5x on an
// H200, at 16 rows (two mmas a step) it did not.
constexpr int kMaxMatvecRows = 8;

// The normed variants (a projection of RMSNorm(x + delta)) stage x's normed rows in shared memory: they take x when
// its rows times K are within this (32 KB of bfloat16) and K is a multiple of 8; nullopt otherwise.
constexpr int kMaxStagedElements = 16384;

// The warps a 16-row tile of the kernel gets for a packed weight of `rows` rows (gate and up rows when gated) and
// `words` uint32 words a row: more for a product of few tiles, so that enough loads are in flight (its launch;
// also read by benchmarks/gpu/matvec_bench.py).
int matvec_warps_per_tile(int rows, int words, bool gated);

// x W^T with W [N, K] packed affine 4/8-bit in groups of 32/64/128 (`q`: its packing), its scales and biases in x's
// dtype (bfloat16/float16), or W in x's half-precision dtype itself (q null; under MLXRUNNER_HALF_MATVEC=1 only);
// x [..., K] with at most kMaxMatvecRows rows. nullopt when not on CUDA or the case is not one of those: the caller
// uses MLX's own product.
std::optional<mx::array> cuda_matvec(const mx::array& x, const mx::array& w, const Quantized* q);

// silu(x G^T) * (x U^T) for a packed gate and up projection stacked as W = [G; U] ([2 I, K], gate rows first, as
// GatedMLP's fused gate_up_proj holds them): [..., I], the same numbers as the product followed by the gated SiLU, in
// one kernel. Same cases as cuda_matvec; nullopt otherwise.
std::optional<mx::array> cuda_swiglu_matvec(const mx::array& x, const mx::array& w, const Quantized* q);

// What a transformer layer's projection reads: RMSNorm(x + delta) with `weight` and `eps` (RMSNorm(x) without a delta).
struct NormInput {
  mx::array x;
  std::optional<mx::array> delta;
  mx::array weight;
  float eps;
};

// The product of the normed input with W (gated: the swiglu product above), the sum and the norm made in the
// product's kernel: (x + delta, or x itself without a delta; the product). Two kernels fewer a decoder layer than
// the add-and-norm kernel before each product. The same cases as cuda_matvec, the norm's weight in x's dtype.
std::optional<std::pair<mx::array, mx::array>> cuda_normed_matvec(const NormInput& input, const mx::array& w,
                                                                  const Quantized* q, bool gated);

// How a decoder layer's q|k|v projection splits into heads, and what is done to its queries and keys before attention.
struct HeadSplit {
  int q_heads, kv_heads;
  std::optional<QkNorms> norms;  // per-head RMSNorms (Qwen3, Gemma 3)
  FusedRope rope;
  mx::array offsets;  // int [B] or [1]: each sequence's first position
};

// A layer's residual sum and attention's inputs, heads first: q [B, q_heads, T, D], k and v [B, kv_heads, T, D].
struct QkvHeads {
  mx::array sum, q, k, v;
};

// The normed product above with a q|k|v projection W [(q_heads + 2 kv_heads) D, K], its heads then given their q/k
// norms and RoPE as cuda_qkv_heads gives them: the add-and-norm, the product and the q/k kernel in one (a decode
// step's three operations before attention). x [B, T, K] with B T <= kMaxMatvecRows; heads of up to 128 dimensions
// (a multiple of 16); the cases of cuda_normed_matvec otherwise.
std::optional<QkvHeads> cuda_normed_qkv_heads(const NormInput& input, const mx::array& w, const Quantized* q,
                                              const HeadSplit& split);

}  // namespace mlxr
