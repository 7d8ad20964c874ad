// A diffusion transformer block's small operations folded into single CUDA kernels.
//
// Beside its products and attention (the same cuBLAS and cuDNN kernels diffusers runs), a 1024^2 Z-Image step on an
// H200 spent ~20 of its 108 ms in kernels that each read and write a whole activation once: per-head q/k RMSNorms,
// RoPE, and the sandwich norms with their modulation scales, gates and residual adds (benchmarks/README.md,
// "Profiles"). These kernels take each chain of them into one launch:
// - a head's RMSNorm and its RoPE by a table of angles (queries and keys);
// - an RMSNorm times a per-sample scale (a modulated block's input);
// - the gated residual x + gate * RMSNorm(a), optionally followed by the next modulated norm of that sum;
// - FLUX.2's modulated LayerNorm, (1 + scale) * layer_norm(x) + shift, optionally after a gated residual.
// Each returns nullopt off CUDA or outside the case it handles; the caller then runs MLX's operations. The numbers
// are MLX's: the same roundings to the input dtype at the same places; only the order of a norm's float sum of
// squares differs. MLXRUNNER_DIT_FUSION=0 in the environment turns them off (to measure what they gain).
#pragma once

#include <optional>
#include <utility>

#include "nn/norm.h"
#include "nn/rope.h"

namespace mlxr {

// Per-head RMSNorm (when given) then RoPE of adjacent pairs (2i, 2i + 1) by a table of angles (RopeTable's cos and
// sin, or rows of them), for x [B, T, H, D] (any strides, D's 1); cos, sin: [1 or B, T, 1, D / 2] float32 (any
// strides). Returns [B, T, H, D], row-contiguous.
std::optional<mx::array> cuda_head_norm_rope_pairs(const mx::array& x, const std::optional<RMSNorm>& norm,
                                                   const mx::array& cos, const mx::array& sin);

// norm(x) * scale: x [B, T, N], scale [B, 1, N], all of one dtype.
std::optional<mx::array> cuda_scaled_rms_norm(const mx::array& x, const RMSNorm& norm, const mx::array& scale);

// A modulated norm that follows a residual: `norm(h) * scale`.
struct NextNorm {
  const RMSNorm& norm;
  const mx::array& scale;  // [B, 1, N]
};

// h = x + gate * a_norm(a), and with `next` also next.norm(h) * next.scale: x, a [B, T, N], gate [B, 1, N].
std::optional<std::pair<mx::array, std::optional<mx::array>>> cuda_gated_residual(const mx::array& x,
                                                                                  const mx::array& a,
                                                                                  const RMSNorm& a_norm,
                                                                                  const mx::array& gate,
                                                                                  const std::optional<NextNorm>& next);

// FLUX.2's modulation: layer_norm(x) (no affine parameters) * one_plus_scale + shift, x [B, T, N], the vectors
// [B, 1, N] (any strides along N's 1): one kernel.
std::optional<mx::array> cuda_modulated_layer_norm(const mx::array& x, const mx::array& shift,
                                                   const mx::array& one_plus_scale, float eps);

// gate * y, the gated term of a residual: y [B, T, N], gate [B, 1, N].
struct GatedTerm {
  const mx::array& y;
  const mx::array& gate;
};

// (h, modulated layer_norm of h) with h = x + gate * y when `residual` is given, else (x, that of x).
std::optional<std::pair<mx::array, mx::array>> cuda_gated_residual_modulated_layer_norm(
    const mx::array& x, const std::optional<GatedTerm>& residual, const mx::array& shift,
    const mx::array& one_plus_scale, float eps);

}  // namespace mlxr
