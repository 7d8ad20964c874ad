// Softmax, attention, GELU, SiLU, LayerNorm, RMSNorm, GroupNorm, convolutions and packed affine 4/8-bit products for
// MLX's CPU backend, on every core.
//
// MLX 0.32's x86 CPU backend computes these one element at a time on one thread: its SIMD width there is 1,
// and its exp (in softmax and sigmoid) calls libm's software fma six times per element. In a BERT layer on a
// 2-core machine softmax (inside attention) and GELU took half the time next to the matmuls, and SiLU is the
// VAE's most frequent op (benchmarks/README.md). These primitives split their rows (softmax) or elements over
// the cores and let the compiler vectorise the arithmetic, while doing exactly MLX's operations in MLX's order:
// results are bit-identical to mx::softmax, to the op-by-op GELU graph and to x * mx::sigmoid(x)
// (tests/unit/test_cpu_kernels.py).
#pragma once

#include <optional>
#include <vector>

#include "mlx/mlx.h"

namespace mlxr {

namespace mx = mlx::core;

// Whether `x` takes these kernels: float32 on the CPU.
bool on_cpu_kernels(const mx::array& x);

// The cores these kernels split their work over (at least 1).
size_t cpu_cores();

// mx::softmax(x, -1) for on_cpu_kernels(x).
mx::array softmax_last_axis(const mx::array& x);
// The same of mx::where(allowed, x, lowest float) in one pass, where `keys_allowed` [1 or x.shape(0), keys] says
// which of the last axis' entries each batch element keeps (a padding mask over the keys).
mx::array masked_softmax_last_axis(const mx::array& x, const mx::array& keys_allowed);

// softmax(scale q k^T) v for q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] float32 on the CPU (Hq a multiple of Hkv),
// the keys that `keys_allowed` [1 or B, Lk] (bools) does not keep masked out, head by head, each head on one core.
// With the AVX2 or AVX-512 loops both products run on the convolution's block kernel, in bands of queries: MLX's
// numbers within float32 rounding. With the baseline loops, MLX's CPU attention (mlx/fast.cpp's fallback with the
// products mx::matmul makes) with one BLAS thread a head: bit for bit MLX's with OpenBLAS on one thread; with
// OpenBLAS on several, wherever its threaded driver blocks the key axis as its one-thread driver does (every length
// tested up to 333 and the multiples of 32, not 500).
// Returns the [B, Hq, Lq, Dv] view of a [B, Lq, Hq, Dv] array.
mx::array attention_cpu(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                        const std::optional<mx::array>& keys_allowed);
// attention_cpu over sequences packed one after another along the token axis, with no padding: q [1, Hq, N, D], k
// and v [1, Hkv, N, D], `lengths` (each at least 1) summing to N; each sequence's queries attend to its own keys
// only. Each (sequence, head) is one task on one core. Returns the [1, Hq, N, Dv] view of a [1, N, Hq, Dv] array.
mx::array packed_attention_cpu(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                               const std::vector<int>& lengths);

// gelu() (the erf form, with Eigen's rational erf) for on_cpu_kernels(x).
mx::array gelu_erf_cpu(const mx::array& x);

// x * sigmoid(x) for on_cpu_kernels(x); and that times `up` (the same shape and dtype) for gated_silu().
mx::array silu_cpu(const mx::array& x);
mx::array gated_silu_cpu(const mx::array& gate, const mx::array& up);
// gated_silu_cpu of two column ranges of `fused` [..., W] float32 (a fused projection's output), [gate_at,
// gate_at + width) and [up_at, up_at + width), read in place: the same numbers without copying both out first.
mx::array gated_silu_columns_cpu(const mx::array& fused, int gate_at, int up_at, int width);

// GroupNorm (PyTorch's: per sample and group over every pixel and the group's channels, biased variance) of
// x [N, ..., C] float32, then SiLU when `then_silu`: one pass over x per statistic, on every core, sums in double;
// the normalisation and the SiLU are nn/norm.cpp's float32 arithmetic.
mx::array group_norm_cpu(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups, float eps,
                         bool then_silu);

// mx::fast::layer_norm(x, weight, bias, eps) over the last axis for on_cpu_kernels(x) with float32 weight and bias
// of x's last size, bit for bit; without `bias`, mx::fast::rms_norm(x, weight, eps).
mx::array layer_norm_cpu(const mx::array& x, const mx::array& weight, const std::optional<mx::array>& bias, float eps);

// What a CPU convolution does besides the product, in the same pass over each band of its output.
struct CpuConvExtras {
  std::optional<mx::array> bias;      // [O], added to the product
  std::optional<mx::array> residual;  // the output's shape: residual + (product + bias), MLX's two adds' bits
  bool upsample_2x = false;           // read x as if upsampled 2x (nearest) first: no 4x copy of it
};

// A stride-1 convolution, x [N, H, W, C] float32 and a square weight [O, k, k, C] float32 -> [N, Ho, Wo, O] with
// `padding` zeros on every side, on every core. With the AVX2 or AVX-512 loops: a direct convolution (no im2col
// matrix; MLX's numbers within float32 rounding). With the baseline loops, MLX's CPU convolution's numbers bit for
// bit (its im2col matrix times the weight by cblas_sgemm; the bands keep the product's sums), in small bands instead
// of one side buffer 9x the input built by one thread.
mx::array conv2d_cpu(const mx::array& x, const mx::array& weight, int padding, const CpuConvExtras& extras = {});

// y + bias over y's last axis for on_cpu_kernels(y) (a Linear's bias): mx::add's numbers, on every core.
mx::array bias_add_cpu(const mx::array& y, const mx::array& bias);

// FLUX.2's modulation on every core, one pass each, MLX's ops in their order: one_plus_scale * layer_norm(x) + shift
// (the norm without affine parameters; bit for bit but for the sign of a zero) and x + gate * y; x and y [B, T, N],
// the vectors [B, 1, N], float32 on the CPU.
mx::array modulated_layer_norm_cpu(const mx::array& x, const mx::array& shift, const mx::array& one_plus_scale,
                                   float eps);
mx::array gated_sum_cpu(const mx::array& x, const mx::array& y, const mx::array& gate);

// What follows an encoder's product y [..., N] (float32 on the CPU), in one pass on every core, the ops in MLX's
// order (bit for bit): gelu(y + bias), and layer_norm((y + bias) + residual) with the norm's weight and bias.
mx::array bias_gelu_cpu(const mx::array& y, const mx::array& bias);
mx::array bias_residual_layer_norm_cpu(const mx::array& y, const mx::array& bias, const mx::array& residual,
                                       const mx::array& weight, const mx::array& norm_bias, float eps);

// Which loops this process's CPU kernels run: "baseline", "avx2" or "avx512" (MLXRUNNER_CPU_LOOPS caps it).
const char* cpu_loops_name();

// The DiT blocks' row work on every core, one pass each, bit for bit the op-by-op graphs they replace (MLX runs
// those element-wise ops on one thread, through strided broadcast views for RoPE); float32 on the CPU only.
// Whether the modulation kernels below take x with this per-batch vector (a scale, gate or shift): x [B, T, N]
// float32 on the CPU, the vector float32 [B, 1, N].
bool cpu_modulation_vector(const mx::array& x, const mx::array& vector);
// RMSNorm over each head (when `norm_weight` is given) then RoPE on its (even, odd) pairs, x [B, T, H, D] with the
// last axis contiguous and the heads adjacent (a fused projection's column range), cos and sin [1 or B, T, 1, D/2]:
// out [B, T, H, D] row-contiguous, pair i of a head (x0 cos - x1 sin, x0 sin + x1 cos) as nn/rope.cpp's graph makes.
mx::array head_norm_rope_cpu(const mx::array& x, const std::optional<mx::array>& norm_weight, float eps,
                             const mx::array& cos, const mx::array& sin);
// rms_norm(x) * scale, x [B, T, N], scale [B, 1, N].
mx::array scaled_rms_norm_cpu(const mx::array& x, const mx::array& norm_weight, float eps, const mx::array& scale);
// x + gate * rms_norm(a), x and a [B, T, N], gate [B, 1, N].
mx::array gated_residual_cpu(const mx::array& x, const mx::array& a, const mx::array& norm_weight, float eps,
                             const mx::array& gate);

// x [..., K] float32 times the transpose of a packed affine weight [N, K * bits / 32] of 4 or 8 bits with float32
// scales and biases [N, K / group_size] (group_size a multiple of 8), for the few rows of a decode step: MLX 0.32's
// CPU quantized_matmul sums each output's K terms one at a time on one thread (a 0.6B model's 4-bit decode ran ~2
// tokens a second on 2 cores). Here every core takes a share of the outputs and each output's sum runs eight lanes
// at a time: MLX's numbers within float32 rounding (the terms summed in another order). nullopt for anything else.
std::optional<mx::array> affine_matvec_cpu(const mx::array& x, const mx::array& packed, const mx::array& scales,
                                           const mx::array& biases, int bits, int group_size);

// mx::gather_qmm(x, packed, scales, biases, indices, transpose) for such weights stacked per expert [E, N, ..], x
// [..., 1, K] (one row a product, as a MoE's experts take them): MLX's CPU kernel is the same one-term-at-a-time
// loop. [broadcast of x's leading axes and indices, 1, N]; nullopt for anything else.
std::optional<mx::array> gather_affine_matvec_cpu(const mx::array& x, const mx::array& packed, const mx::array& scales,
                                                  const mx::array& biases, const mx::array& indices, int bits,
                                                  int group_size);

// x [..., K] (any float dtype) times the transpose of a bfloat16 or float16 weight [N, K] on the CPU, for the few rows
// of a decode step: MLX 0.32's CPU has no BLAS path for half-precision products and ran a bf16 LLM's decode at a
// third of its bandwidth. Every core takes a share of the outputs, widening eight weights at a time and summing in
// float; the result in x's dtype. nullopt for anything else (K not a multiple of 8, another device or dtype).
std::optional<mx::array> half_matvec_cpu(const mx::array& x, const mx::array& weight);

// A bfloat16 or float16 array as float32: on the CPU converted on every core (mx::astype converts on one), elsewhere
// (or for a size not a multiple of 8) by mx::astype.
mx::array widened_to_float32(const mx::array& a);

}  // namespace mlxr
