// Weight-matrix layers: fully connected (Linear, FusedLinear) and lookup tables (Embedding).
//
// Each holds its weight as the checkpoint stored it: float, or packed by mx::quantize (`quantized`
// set; nn/weights.h). Packed weights stay packed in memory: a Linear multiplies with
// mx::quantized_matmul, an Embedding dequantizes only the rows it looks up.
#pragma once

#include "nn/cuda_matvec.h"
#include "nn/weights.h"

namespace mlxr {

// y = x W^T + b, W stored as PyTorch does: [out_features, in_features] (packed: [out, in * bits / 32]).
struct Linear {
  mx::array weight;
  std::optional<mx::array> bias;
  std::optional<Quantized> quantized;
  // A float weight's [in, out] view (the same buffer), made once by load() and concat(): a product then adds no
  // transpose to each forward, where even a view is an MLX operation the host builds and evaluates (~5 µs on this
  // VM's CPU; a bf16 decode step has ~145 of them). Used only while it is still a view of `weight` (product());
  // a Linear built another way transposes at each product, as before.
  std::optional<mx::array> transposed;

  static Linear load(const Weights& w, int in_features, int out_features, bool with_bias = true);
  // One layer computing `parts` side by side (outputs concatenated in order): one matmul instead
  // of several over the same input. The parts must be all float, or all packed alike
  // (can_concat); the concatenation stays lazy until evaluated.
  static Linear concat(const std::vector<Linear>& parts);
  static bool can_concat(const Linear& a, const Linear& b);
  // The same layer computing only its output features [begin, end): views of those rows of the weight (packed rows,
  // scales and biases alike: groups run along a row) and of the bias, no copy. For a caller that needs some of a
  // fused projection's columns for some rows only.
  Linear outputs(int begin, int end) const;
  mx::array operator()(const mx::array& x) const;
  // The product alone, without the bias (for a caller that adds it in a later pass of its own).
  mx::array product(const mx::array& x) const;
  int out_features() const { return weight.shape(0); }
  // The packing, or nullptr for a float weight (what nn/cuda_matvec's kernels take).
  const Quantized* packing() const { return quantized ? &*quantized : nullptr; }
  // The float dtype the weight has, or dequantizes to (the scales' for affine, bfloat16 for the
  // microscaled modes, as mx::dequantize gives): the network's dtype where a layer decides it.
  mx::Dtype dtype() const;
  // Every array it holds (to evaluate them).
  std::vector<mx::array> arrays() const;
};

// Whether a packed weight's product with x multiplies a transient dequantized copy of the weight (many rows: a
// prompt's prefill, an image's tokens) rather than the packed weight itself.
bool multiplies_dequantized(const mx::array& x);

// Linears over the same input whose outputs are used side by side (q | k | v, gate | up): runs of
// parts that can be concatenated become one matmul. A float or uniformly quantized checkpoint gives
// one; a mixed-precision one (v_proj at more bits, say) one per run. The output is the same numbers.
struct FusedLinear {
  std::vector<Linear> layers;

  static FusedLinear fuse(const std::vector<Linear>& parts);
  mx::array operator()(const mx::array& x) const;  // [..., sum of the parts' out_features]
  // The parts' outputs, one array each (`widths`: the parts' out_features, in order): column ranges of the one
  // product where they were fused, read in place; no concatenation where they run apart.
  std::vector<mx::array> part_outputs(const mx::array& x, const std::vector<int>& widths) const;
  // (x + delta, the product of its RMSNorm) in one kernel where nn/cuda_matvec takes it (a packed decode step on
  // CUDA, or a half-precision one under MLXRUNNER_HALF_MATVEC=1); nullopt otherwise.
  std::optional<std::pair<mx::array, mx::array>> normed_product(const NormInput& input) const;
  // The same for a q|k|v projection, its heads also given their q/k norms and RoPE (cuda_normed_qkv_heads).
  std::optional<QkvHeads> normed_heads(const NormInput& input, const HeadSplit& split) const;
  // The one bias-free layer these fused kernels may take, if the projection is that; nullptr otherwise.
  const Linear* alone() const;
  std::vector<mx::array> arrays() const;
};

// Token / position lookup table: [num_embeddings, dims] (packed: [num_embeddings, dims * bits / 32]).
struct Embedding {
  mx::array weight;
  std::optional<Quantized> quantized;
  std::optional<mx::array> transposed;  // a float table's [dims, num_embeddings] view, for as_linear (Linear's)

  static Embedding load(const Weights& w, int num_embeddings, int dims);
  mx::array operator()(const mx::array& ids) const;
  // x W^T: the table as a tied output projection (the LM head), packed or not.
  mx::array as_linear(const mx::array& x) const;
  std::vector<mx::array> arrays() const;
};

}  // namespace mlxr
