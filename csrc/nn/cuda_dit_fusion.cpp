#include "nn/cuda_dit_fusion.h"

#include <stdexcept>

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// A warp per (token, head) row of D, lane l holding the rotated pairs l, l + 32, ... (PAIRS = D / 64 of them): each
// pair one load and one store of 2 T, a warp's loads 32 consecutive pairs, the norm's sum over the warp's shuffles
// only. (A block of D / 2 threads per row, summing through shared memory and two barriers, ran at 0.39 TB/s on an
// H200: 162 us for a 1024^2 Z-Image's queries, 10.7 ms of its 102 ms step.) out is x's shape, row-contiguous.
// MLX's rms_norm rounds x * rsqrt(mean + eps) to T and multiplies it by the weight in T; RoPE (nn/rope.cpp's
// kernel) reads that T and rounds each rotated value to T.
constexpr const char* kHeadNormRopePairs = R"(
  struct alignas(2 * sizeof(T)) Pair { T first, second; };
  const int lane = threadIdx.x & 31;
  const int tokens = x_shape[1], heads = x_shape[2];
  const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;  // (b T + t) H + h
  if (row >= static_cast<long long>(x_shape[0]) * tokens * heads) return;  // whole warps: uniform per warp
  const int h = static_cast<int>(row % heads);
  const long long token = row / heads;
  const long long b = token / tokens, t = token % tokens;
  const T* src = x + b * x_strides[0] + t * x_strides[1] + h * x_strides[2];
  const bool aligned = (reinterpret_cast<unsigned long long>(src) % sizeof(Pair)) == 0;
  float x0[PAIRS], x1[PAIRS];
  float squares = 0.f;
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) {
    const int i = lane + 32 * p;
    if (aligned) {
      const Pair pair = reinterpret_cast<const Pair*>(src)[i];
      x0[p] = static_cast<float>(pair.first);
      x1[p] = static_cast<float>(pair.second);
    } else {
      x0[p] = static_cast<float>(src[2 * i]);
      x1[p] = static_cast<float>(src[2 * i + 1]);
    }
    squares += x0[p] * x0[p] + x1[p] * x1[p];
  }
  // The angles' cosines and sines (and the norm's weight) are loaded before the norm's shuffles, with x.
  const long long table_b = cos_table_shape[0] == 1 ? 0 : b;
  const float* cos_row = cos_table + table_b * cos_table_strides[0] + t * cos_table_strides[1];
  const float* sin_row = sin_table + table_b * sin_table_strides[0] + t * sin_table_strides[1];
  float c[PAIRS], s[PAIRS];
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) {
    const int i = lane + 32 * p;
    c[p] = cos_row[i * cos_table_strides[3]];
    s[p] = sin_row[i * sin_table_strides[3]];
  }
#if NORM
  T w0[PAIRS], w1[PAIRS];
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) {
    const int i = lane + 32 * p;
    w0[p] = weight[2 * i];
    w1[p] = weight[2 * i + 1];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
  const float normalizer = rsqrtf(squares / D + __int_as_float(EPS_BITS));
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) {
    x0[p] = static_cast<float>(w0[p] * static_cast<T>(x0[p] * normalizer));
    x1[p] = static_cast<float>(w1[p] * static_cast<T>(x1[p] * normalizer));
  }
#endif
  Pair* dst = reinterpret_cast<Pair*>(out + row * D);
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) {
    const int i = lane + 32 * p;
    dst[i] = Pair{static_cast<T>(x0[p] * c[p] - x1[p] * s[p]), static_cast<T>(x0[p] * s[p] + x1[p] * c[p])};
  }
)";

// Row kernels (kCudaRowHelpers). Each step rounds to T where MLX's operation would: the norm, the product with the
// scale or gate, the sum. Per-sample vectors [B, 1, N] are row `sample` of N. Everything is loaded before the first
// block_sum (kCudaRowHelpers says why).
constexpr const char* kScaledRmsNorm = R"(
  const int n = weight_shape[0];
  const long long row = blockIdx.x;
  const size_t first = static_cast<size_t>(row) * n;
  float v[PER_THREAD];
  T w[PER_THREAD], s[PER_THREAD];
  const float squares = load_row(x + first, n, v);
  load_row_vector(w, weight, 1, n);
  load_row_vector(s, scale + (row / x_shape[1]) * n, 1, n);
  const float normalizer = rsqrtf(block_sum(squares) / n + __int_as_float(EPS_BITS));
  store_scaled_norm(out + first, v, n, normalizer, w, s);
)";

// h = x + gate * rms_norm(a), then (NEXT) next = rms_norm(h) * next_scale.
constexpr const char* kGatedResidual = R"(
  const int n = a_weight_shape[0];
  const long long row = blockIdx.x;
  const long long sample = row / x_shape[1];
  const size_t first = static_cast<size_t>(row) * n;
  float av[PER_THREAD], xv[PER_THREAD];
  T a_w[PER_THREAD], g[PER_THREAD];
  const float a_squares = load_row(a + first, n, av);
  load_row(x + first, n, xv);
  load_row_vector(g, gate + sample * n, 1, n);
  load_row_vector(a_w, a_weight, 1, n);
#if NEXT
  T next_w[PER_THREAD], next_s[PER_THREAD];
  load_row_vector(next_w, next_weight, 1, n);
  load_row_vector(next_s, next_scale + sample * n, 1, n);
#endif
  const float a_normalizer = rsqrtf(block_sum(a_squares) / n + __int_as_float(EPS_BITS));
  float normed[PER_THREAD], hv[PER_THREAD];
  norm_row(normed, av, n, a_normalizer, a_w);
  const float h_squares = store_residual(h + first, hv, xv, g, normed, n);
#if NEXT
  const float h_normalizer = rsqrtf(block_sum(h_squares) / n + __int_as_float(NEXT_EPS_BITS));
  store_scaled_norm(next + first, hv, n, h_normalizer, next_w, next_s);
#endif
)";

// FLUX.2's modulation: LayerNorm without affine parameters, then (1 + scale) * . + shift, optionally after the gated
// residual x + gate * y that precedes it (then written too, as h). MLX's layer_norm takes the mean from a float sum
// and the variance from a second pass over x - mean, rounds (x - mean) * rsqrt(var + eps) to T; the product and
// the sum after it round to T. Per-sample vectors [B, 1, N] are read through their strides (they are ranges of one
// modulation output, shared by every block).
constexpr const char* kModulatedLayerNorm = R"(
  const float eps = __int_as_float(EPS_BITS);
  const int n = x_shape[2];
  const long long row = blockIdx.x;
  const long long sample = row / x_shape[1];
  const size_t first = static_cast<size_t>(row) * n;
  T scale_v[PER_THREAD], shift_v[PER_THREAD];
  load_row_vector(scale_v, one_plus_scale + sample * one_plus_scale_strides[0], one_plus_scale_strides[2], n);
  load_row_vector(shift_v, shift + sample * shift_strides[0], shift_strides[2], n);
  float v[PER_THREAD];
#if RESIDUAL
  float yv[PER_THREAD], xv[PER_THREAD];
  T g[PER_THREAD];
  load_row(y + first, n, yv);
  load_row(x + first, n, xv);
  load_row_vector(g, gate + sample * gate_strides[0], gate_strides[2], n);
  store_residual(h + first, v, xv, g, yv, n);
#else
  load_row(x + first, n, v);
#endif
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) sum += v[k];
  const float mean = block_sum(sum) / n;
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const float centred = held_index(k) < n ? v[k] - mean : 0.f;
    squares += centred * centred;
  }
  const float normalizer = rsqrtf(block_sum(squares) / n + eps);
  T result[PER_THREAD];
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const T scaled = scale_v[k] * static_cast<T>((v[k] - mean) * normalizer);
    result[k] = scaled + shift_v[k];
  }
  store_held_row(out + first, result, n);
)";

// MLXRUNNER_DIT_FUSION=0 turns these kernels off (MLX's operations run instead): a switch for measuring what they
// gain, in the same process setup, and a way around them should a driver's compiler reject one.
bool fusion_on_cuda() {
  static EnvSwitch dit_fusion("MLXRUNNER_DIT_FUSION");
  return !dit_fusion.off() && running_on_cuda();
}

// x [B, T, N] of a float dtype, weights [N] and per-sample [B, 1, N] vectors of the same dtype.
bool rows_with_vectors(const mx::array& x, const std::vector<const mx::array*>& weights,
                       const std::vector<const mx::array*>& per_sample) {
  if (x.ndim() != 3 || !cuda_float_dtype(x.dtype())) return false;
  const int n = x.shape(2);
  if (n == 0 || x.size() == 0) return false;
  for (const auto* w : weights) {
    if (w->dtype() != x.dtype() || w->ndim() != 1 || w->shape(0) != n) return false;
  }
  for (const auto* v : per_sample) {
    if (v->dtype() != x.dtype() || v->shape() != mx::Shape{x.shape(0), 1, n}) return false;
  }
  return true;
}

// The launch of a row kernel over x [B, T, N].
std::optional<CudaRowLaunch> row_launch(const mx::array& x) {
  return cuda_row_launch(static_cast<long long>(x.shape(0)) * x.shape(1), x.shape(2), /*in_quads=*/true);
}

}  // namespace

std::optional<mx::array> cuda_head_norm_rope_pairs(const mx::array& x, const std::optional<RMSNorm>& norm,
                                                   const mx::array& cos, const mx::array& sin) {
  if (!fusion_on_cuda() || x.ndim() != 4 || !cuda_float_dtype(x.dtype()) || x.strides(3) != 1) return std::nullopt;
  const int b = x.shape(0), t = x.shape(1), heads = x.shape(2), d = x.shape(3);
  // A lane holds D / 64 pairs: heads of 64 to 2,048 dimensions in steps of 64 (Z-Image and FLUX.2: 128).
  if (d % 64 != 0 || d > 2048) return std::nullopt;
  for (const auto* table : {&cos, &sin}) {
    if (table->dtype() != mx::float32 || table->ndim() != 4 || table->shape(1) != t || table->shape(2) != 1 ||
        table->shape(3) != d / 2 || (table->shape(0) != 1 && table->shape(0) != b)) {
      return std::nullopt;
    }
  }
  if (norm && (norm->weight.dtype() != x.dtype() || norm->weight.ndim() != 1 || norm->weight.shape(0) != d)) {
    return std::nullopt;
  }
  static auto with_norm = cuda_kernel("mlxr_head_norm_rope_pairs", {"x", "weight", "cos_table", "sin_table"}, {"out"},
                                      kHeadNormRopePairs, "#define NORM 1\n", false);
  static auto without_norm = cuda_kernel("mlxr_head_rope_pairs", {"x", "cos_table", "sin_table"}, {"out"},
                                         kHeadNormRopePairs, "#define NORM 0\n", false);
  // A warp a row, eight rows a block.
  constexpr int kThreadsPerBlock = 256;
  const long long rows = static_cast<long long>(b) * t * heads;
  const long long threads = (rows * 32 + kThreadsPerBlock - 1) / kThreadsPerBlock * kThreadsPerBlock;
  const std::tuple<int, int, int> grid{cuda_checked_threads(threads), 1, 1};
  const std::tuple<int, int, int> block{kThreadsPerBlock, 1, 1};
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> args{{"T", x.dtype()}, {"D", d}, {"PAIRS", d / 64}};
  if (norm) {
    args.emplace_back("EPS_BITS", cuda_float_bits(norm->eps));
    return with_norm({x, norm->weight, cos, sin}, {x.shape()}, {x.dtype()}, grid, block, args, std::nullopt, false,
                     {})[0];
  }
  return without_norm({x, cos, sin}, {x.shape()}, {x.dtype()}, grid, block, args, std::nullopt, false, {})[0];
}

std::optional<mx::array> cuda_scaled_rms_norm(const mx::array& x, const RMSNorm& norm, const mx::array& scale) {
  if (!fusion_on_cuda() || !rows_with_vectors(x, {&norm.weight}, {&scale})) return std::nullopt;
  const auto launch = row_launch(x);
  if (!launch) return std::nullopt;
  static auto kernel = cuda_kernel("mlxr_scaled_rms_norm", {"x", "weight", "scale"}, {"out"}, kScaledRmsNorm,
                                   std::string(kCudaBlockSum) + kCudaRowHelpers,
                                   /*ensure_row_contiguous=*/true);
  return kernel({x, norm.weight, scale}, {x.shape()}, {x.dtype()}, launch->grid, launch->block,
                {{"T", x.dtype()}, {"EPS_BITS", cuda_float_bits(norm.eps)}, {"PER_THREAD", launch->per_thread}},
                std::nullopt, false, {})[0];
}

std::optional<std::pair<mx::array, std::optional<mx::array>>> cuda_gated_residual(const mx::array& x,
                                                                                  const mx::array& a,
                                                                                  const RMSNorm& a_norm,
                                                                                  const mx::array& gate,
                                                                                  const std::optional<NextNorm>& next) {
  if (!fusion_on_cuda() || a.shape() != x.shape() || a.dtype() != x.dtype()) return std::nullopt;
  std::vector<const mx::array*> weights{&a_norm.weight}, per_sample{&gate};
  if (next) {
    weights.push_back(&next->norm.weight);
    per_sample.push_back(&next->scale);
  }
  if (!rows_with_vectors(x, weights, per_sample)) return std::nullopt;
  const auto launch = row_launch(x);
  if (!launch) return std::nullopt;
  static auto alone = cuda_kernel("mlxr_gated_residual", {"x", "a", "a_weight", "gate"}, {"h"}, kGatedResidual,
                                  std::string(kCudaBlockSum) + kCudaRowHelpers + "#define NEXT 0\n", true);
  static auto with_next = cuda_kernel(
      "mlxr_gated_residual_norm", {"x", "a", "a_weight", "gate", "next_weight", "next_scale"}, {"h", "next"},
      kGatedResidual, std::string(kCudaBlockSum) + kCudaRowHelpers + "#define NEXT 1\n", true);
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> args{
      {"T", x.dtype()}, {"EPS_BITS", cuda_float_bits(a_norm.eps)}, {"PER_THREAD", launch->per_thread}};
  if (!next) {
    return std::pair{alone({x, a, a_norm.weight, gate}, {x.shape()}, {x.dtype()}, launch->grid, launch->block, args,
                           std::nullopt, false, {})[0],
                     std::optional<mx::array>{}};
  }
  args.emplace_back("NEXT_EPS_BITS", cuda_float_bits(next->norm.eps));
  auto out = with_next({x, a, a_norm.weight, gate, next->norm.weight, next->scale}, {x.shape(), x.shape()},
                       {x.dtype(), x.dtype()}, launch->grid, launch->block, args, std::nullopt, false, {});
  return std::pair{out[0], std::optional<mx::array>{out[1]}};
}

std::optional<mx::array> cuda_modulated_layer_norm(const mx::array& x, const mx::array& shift,
                                                   const mx::array& one_plus_scale, float eps) {
  auto out = cuda_gated_residual_modulated_layer_norm(x, std::nullopt, shift, one_plus_scale, eps);
  if (!out) return std::nullopt;
  return out->second;
}

std::optional<std::pair<mx::array, mx::array>> cuda_gated_residual_modulated_layer_norm(
    const mx::array& x, const std::optional<GatedTerm>& residual, const mx::array& shift,
    const mx::array& one_plus_scale, float eps) {
  std::vector<const mx::array*> per_sample{&shift, &one_plus_scale};
  if (residual) {
    if (residual->y.shape() != x.shape() || residual->y.dtype() != x.dtype()) return std::nullopt;
    per_sample.push_back(&residual->gate);
  }
  if (!fusion_on_cuda() || !rows_with_vectors(x, {}, per_sample)) return std::nullopt;
  for (const auto* v : per_sample) {
    if (v->strides(2) != 1 && v->shape(2) > 1) return std::nullopt;
  }
  const auto launch = row_launch(x);
  if (!launch) return std::nullopt;
  static auto alone =
      cuda_kernel("mlxr_modulated_layer_norm", {"x", "one_plus_scale", "shift"}, {"out"}, kModulatedLayerNorm,
                  std::string(kCudaBlockSum) + kCudaRowHelpers + "#define RESIDUAL 0\n", false);
  static auto after_residual = cuda_kernel(
      "mlxr_gated_residual_modulated_layer_norm", {"x", "y", "gate", "one_plus_scale", "shift"}, {"h", "out"},
      kModulatedLayerNorm, std::string(kCudaBlockSum) + kCudaRowHelpers + "#define RESIDUAL 1\n", false);
  const std::vector<std::pair<std::string, mx::fast::TemplateArg>> args{
      {"T", x.dtype()}, {"EPS_BITS", cuda_float_bits(eps)}, {"PER_THREAD", launch->per_thread}};
  // The rows are read as contiguous (a no-op for the blocks' outputs, which are).
  auto rows_of = [](const mx::array& a) { return mx::contiguous(a); };
  if (!residual) {
    auto out = alone({rows_of(x), one_plus_scale, shift}, {x.shape()}, {x.dtype()}, launch->grid, launch->block, args,
                     std::nullopt, false, {})[0];
    return std::pair{x, out};
  }
  auto out =
      after_residual({rows_of(x), rows_of(residual->y), residual->gate, one_plus_scale, shift}, {x.shape(), x.shape()},
                     {x.dtype(), x.dtype()}, launch->grid, launch->block, args, std::nullopt, false, {});
  return std::pair{out[0], out[1]};
}

}  // namespace mlxr
