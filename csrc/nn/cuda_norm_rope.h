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

// Per-head RMSNorms on the query and key heads (cuda_qkv_heads, below): their weights and eps.
struct QkNorms {
  mx::array q_weight, k_weight;
  float eps;
};
// One head's per-head RMSNorm (NORM) and RoPE, made by one warp, as a device function in the kernels' header: the q/k
// kernel's (cuda_qkv_heads) and the decode attention kernel's that makes them itself (cuda_decode_attention with a
// DecodeRope), so that both give the same bits. Lane l holds the pairs i = l + 32 p, p < D / 64 (halves (i, i + D / 2),
// or (2 i, 2 i + 1) with TRADITIONAL), src's elements `stride` apart; every load (the pairs, their angles' frequencies,
// the norm's weights) comes before the sum of squares, which meets by shuffles alone. The normed value is rounded to T,
// multiplied by the weight and rounded again (MLX's rms_norm), the rotation in float and rounded once into dst.
inline constexpr const char* kCudaHeadNormRope = R"(
namespace mlxr_rope {
template <typename T, int D, bool TRADITIONAL, bool NORM>
__device__ __forceinline__ void norm_rope_head(const T* src, long long stride, const T* weight, float eps,
                                               const float* inverse_frequencies, float position, T* dst) {
  constexpr int kPairs = D / 64;
  constexpr int half = D / 2;
  const int lane = threadIdx.x & 31;
  float x1[kPairs], x2[kPairs], theta[kPairs], w1[kPairs], w2[kPairs];
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const int i = lane + 32 * p;
    const int at1 = TRADITIONAL ? 2 * i : i, at2 = TRADITIONAL ? 2 * i + 1 : i + half;
    x1[p] = static_cast<float>(src[at1 * stride]);
    x2[p] = static_cast<float>(src[at2 * stride]);
    theta[p] = position * inverse_frequencies[i];
    if (NORM) {
      w1[p] = static_cast<float>(weight[at1]);
      w2[p] = static_cast<float>(weight[at2]);
    }
  }
  if (NORM) {
    float squares = 0.f;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) squares += x1[p] * x1[p] + x2[p] * x2[p];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
    const float normalizer = rsqrtf(squares / D + eps);
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      x1[p] = static_cast<float>(static_cast<T>(w1[p] * static_cast<float>(static_cast<T>(x1[p] * normalizer))));
      x2[p] = static_cast<float>(static_cast<T>(w2[p] * static_cast<float>(static_cast<T>(x2[p] * normalizer))));
    }
  }
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const int i = lane + 32 * p;
    const int at1 = TRADITIONAL ? 2 * i : i, at2 = TRADITIONAL ? 2 * i + 1 : i + half;
    const float c = cos(theta[p]), s = sin(theta[p]);
    dst[at1] = static_cast<T>(x1[p] * c - x2[p] * s);
    dst[at2] = static_cast<T>(x1[p] * s + x2[p] * c);
  }
}
}  // namespace mlxr_rope
)";

// Whether norm_rope_head takes heads of `d` elements of `dtype` with this RoPE and these norms: d a multiple of 64 up
// to 512 (a lane holds d / 64 pairs in registers), d / 2 float32 frequencies (it reads them as float), norm weights
// of d elements of dtype. Both kernels that call it ask this.
bool head_norm_rope_fits(int d, mx::Dtype dtype, const FusedRope& rope, const std::optional<QkNorms>& norms);

// The query, key and value heads of a fused q|k|v projection's output, heads first ([B, heads, T, D]) and contiguous.
struct HeadsFirst {
  mx::array q, k, v;
};

// The per-head norms and RoPE of the query and key heads (QkNorms above: absent, or both given with eps; RoPE at
// position offsets[b] + t, offsets int32 [B] or [1]) and the value heads copied, from qkv [B, T, q_heads + 2 kv_heads,
// D] or the projection's output itself, [B, T, (q_heads + 2 kv_heads) D]: one kernel where MLX took a reshape, the q/k
// kernel, and a slice and a transpose for the values.
std::optional<HeadsFirst> cuda_qkv_heads(const mx::array& qkv, int q_heads, int kv_heads,
                                         const std::optional<QkNorms>& norms, const FusedRope& rope,
                                         const mx::array& offsets);

// silu(gate) * up, gate and up the columns [gate_at, gate_at + width) and [up_at, up_at + width) of fused [..., W]
// (a gate|up projection's output): [..., width], the bits of gated_silu of the two column slices (nn/activation.h),
// in one kernel.
std::optional<mx::array> cuda_gated_silu_columns(const mx::array& fused, int gate_at, int up_at, int width);

}  // namespace mlxr
