// A decoder layer's small operations folded into single CUDA kernels.
//
// A decode token is a few hundred small kernels, each built, encoded and launched from the host; beside the
// products, a Llama/Qwen3 layer spent its time in RMSNorms, RoPE and the residual adds (benchmarks/README.md,
// "Profiles"). Two kernels take five or six of those launches per layer down to two:
// - the residual add and the RMSNorm after it (twice a layer);
// - the queries' and keys' per-head RMSNorm (Qwen3, Gemma 3) and their RoPE, read straight from the fused q|k|v
//   projection.
// Each returns nullopt off CUDA or outside the case it handles; the caller then runs MLX's operations. The
// numbers are MLX's: the same roundings to the input dtype at the same places; only the order of the float sum
// of squares differs.
#pragma once

#include <optional>
#include <utility>

#include "nn/weights.h"

namespace mlxr {

// (x + delta, rms_norm(x + delta) * weight) over the last axis, both in x's dtype. x, delta: [..., N] of one
// float dtype, weight: [N] of it.
std::optional<std::pair<mx::array, mx::array>> cuda_add_rms_norm(const mx::array& x, const mx::array& delta,
                                                                 const mx::array& weight, float eps);

// How queries and keys are rotated: per rotated pair i < head_dim / 2, the angle is position *
// inverse_frequencies[i] (float32); `traditional` rotates interleaved pairs (2i, 2i + 1), otherwise halves (i,
// i + head_dim / 2). The whole head is rotated.
struct FusedRope {
  mx::array inverse_frequencies;
  bool traditional;
};

// Per-head RMSNorms on the query and key heads (absent together, or both given with eps), then RoPE at position
// offsets[b] + t, for qkv [B, T, q_heads + 2 kv_heads, D] (the fused projection's output, heads split): returns
// (q [B, q_heads, T, D], k [B, kv_heads, T, D]), heads first as attention takes them. offsets: int32 [B] or [1].
struct QkNorms {
  mx::array q_weight, k_weight;
  float eps;
};
std::optional<std::pair<mx::array, mx::array>> cuda_qk_norm_rope(const mx::array& qkv, int q_heads, int kv_heads,
                                                                 const std::optional<QkNorms>& norms,
                                                                 const FusedRope& rope, const mx::array& offsets);

}  // namespace mlxr
