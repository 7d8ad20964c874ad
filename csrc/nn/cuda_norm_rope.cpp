#include "nn/cuda_norm_rope.h"

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// One block per row, a thread per quad of the row where it fits (kCudaRowHelpers: 8-byte loads of bfloat16, every
// load before the block-wide sum). MLX's add rounds x + delta to T; its rms_norm multiplies the float x * rsqrt(mean +
// eps), rounded to T, by the weight in T: the same here. EPS_BITS: eps as a float's bits (template arguments are
// ints). A decode step runs it twice a layer on one row, so its latency is what counts: the first version (one
// element a load, 256 threads) took 4.5 us a row of 4,096 in an 8B step on an H100, this one 3.4 (8B bf16 decode
// 154.6 -> 157.3-158.2 tok/s on one machine, session 23).
constexpr const char* kAddRmsNorm = R"(
  const float eps = __int_as_float(EPS_BITS);
  const int n = weight_shape[0];
  const size_t first = static_cast<size_t>(blockIdx.x) * n;
  float xv[PER_THREAD], dv[PER_THREAD];
  T w[PER_THREAD];
  load_row(x + first, n, xv);
  load_row(delta + first, n, dv);
  load_row_vector(w, weight, 1, n);
  float h[PER_THREAD];
  T sum[PER_THREAD];
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    sum[k] = static_cast<T>(xv[k] + dv[k]);
    h[k] = held_index(k) < n ? static_cast<float>(sum[k]) : 0.f;
    squares += h[k] * h[k];
  }
  const float normalizer = rsqrtf(block_sum(squares) / n + eps);
  store_held_row(added + first, sum, n);
  float normed_values[PER_THREAD];
  norm_row(normed_values, h, n, normalizer, w);
  T out[PER_THREAD];
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) out[k] = static_cast<T>(normed_values[k]);
  store_held_row(normed + first, out, n);
)";

// A warp per (token, head) of q, k and v, kQkHeadsABlock heads a block, each lane holding D / 64 rotated pairs
// (kCudaHeadNormRope's norm_rope_head); heads below Q_HEADS are queries, the last KV_HEADS values (copied, so that
// attention reads them without MLX's slice and transpose, two operations a layer on the host). Written heads first ([B,
// heads, T, D], as attention and the cache take them: no copy to reorder them). The first version, a block a head and a
// thread a pair, summed through block_sum's two barriers: on an H100 it took 6.4 us for a decode step's 40 heads (this
// one 4.0) and 76.6 us for a 3,000-token prompt's (44.0) (benchmarks/README.md, "Session 26": the two sources timed in
// one call).
constexpr int kQkHeadsABlock = 4;
constexpr const char* kQkRope = R"(
  const long long item = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int tokens = qkv_shape[1];
  if (item >= static_cast<long long>(qkv_shape[0]) * tokens * (Q_HEADS + 2 * KV_HEADS)) return;
  const int head = item % (Q_HEADS + 2 * KV_HEADS);
  const long long token = item / (Q_HEADS + 2 * KV_HEADS);  // b * T + t
  const long long b_index = token / tokens, t_index = token % tokens;
  const T* src = qkv + (token * (Q_HEADS + 2 * KV_HEADS) + head) * D;
  if (head >= Q_HEADS + KV_HEADS) {  // a value head: copied as it is
    T* v_dst = v_out + ((b_index * KV_HEADS + head - Q_HEADS - KV_HEADS) * tokens + t_index) * D;
    for (int j = threadIdx.x & 31; j < D; j += 32) v_dst[j] = src[j];
    return;
  }
  T* dst = head < Q_HEADS ? q_out + ((b_index * Q_HEADS + head) * tokens + t_index) * D
                          : k_out + ((b_index * KV_HEADS + head - Q_HEADS) * tokens + t_index) * D;
  const int row = offsets_shape[0] == 1 ? 0 : static_cast<int>(b_index);
  const float position = static_cast<float>(offsets[row] + static_cast<int>(t_index));
#if NORM
  mlxr_rope::norm_rope_head<T, D, TRADITIONAL, true>(src, 1, head < Q_HEADS ? q_weight : k_weight, __int_as_float(EPS_BITS),
                                                     inverse_frequencies, position, dst);
#else
  mlxr_rope::norm_rope_head<T, D, TRADITIONAL, false>(src, 1, nullptr, 0.f, inverse_frequencies, position, dst);
#endif
)";

// silu(gate) * up for columns [GATE_AT, GATE_AT + width) and [UP_AT, UP_AT + width) of each row of `fused` (a fused
// gate|up projection's output; WIDTH: width), a thread an output: what MLX ran as two slices and a compiled kernel,
// three operations the host encodes, here one. The arithmetic is that compiled kernel's: MLX's own functors in T, each
// result rounded to T, so the bits are the same.
constexpr const char* kGatedSiluHelpers = R"(
#include "mlx/backend/cuda/device/binary_ops.cuh"
#include "mlx/backend/cuda/device/unary_ops.cuh"
)";
constexpr const char* kGatedSiluColumns = R"(
  using mlx::core::cu::Multiply;
  long long rows = 1;
  for (int i = 0; i + 1 < fused_ndim; ++i) rows *= fused_shape[i];
  const long long index = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= rows * WIDTH) return;
  const long long row = index / WIDTH;
  const int column = index % WIDTH;
  const T* in = fused + row * fused_shape[fused_ndim - 1];
  const T gate = in[GATE_AT + column];
  out[index] = Multiply{}(Multiply{}(gate, mlx::core::cu::Sigmoid{}(gate)), in[UP_AT + column]);
)";

}  // namespace

std::optional<std::pair<mx::array, mx::array>> cuda_add_rms_norm(const mx::array& x, const mx::array& delta,
                                                                 const mx::array& weight, float eps) {
  if (!running_on_cuda() || x.ndim() < 1 || !cuda_float_dtype(x.dtype()) || delta.dtype() != x.dtype() ||
      weight.dtype() != x.dtype() || delta.shape() != x.shape() || weight.ndim() != 1 ||
      weight.shape(0) != x.shape(-1)) {
    return std::nullopt;
  }
  static auto kernel = cuda_kernel("mlxr_add_rms_norm", {"x", "delta", "weight"}, {"added", "normed"}, kAddRmsNorm,
                                   std::string(kCudaBlockSum) + kCudaRowHelpers, /*ensure_row_contiguous=*/true);
  const int n = x.shape(-1);
  const auto launch = cuda_quad_row_launch(static_cast<long long>(x.size()) / n, n);
  if (!launch) return std::nullopt;
  auto out = kernel({x, delta, weight}, {x.shape(), x.shape()}, {x.dtype(), x.dtype()}, launch->grid, launch->block,
                    {{"T", x.dtype()}, {"EPS_BITS", cuda_float_bits(eps)}, {"PER_THREAD", launch->per_thread}},
                    std::nullopt, false, {});
  return std::pair{out[0], out[1]};
}

bool head_norm_rope_fits(int d, mx::Dtype dtype, const FusedRope& rope, const std::optional<QkNorms>& norms) {
  // Heads of 64 to 512 dimensions in steps of 64 (Llama, Qwen3, Gemma: 64-256).
  const auto fits = [&](const mx::array& weight) { return weight.dtype() == dtype && weight.size() == d; };
  return d % 64 == 0 && d <= 512 && rope.inverse_frequencies.dtype() == mx::float32 &&
         rope.inverse_frequencies.size() == d / 2 && (!norms || (fits(norms->q_weight) && fits(norms->k_weight)));
}

std::optional<HeadsFirst> cuda_qkv_heads(const mx::array& qkv, int q_heads, int kv_heads,
                                         const std::optional<QkNorms>& norms, const FusedRope& rope,
                                         const mx::array& offsets) {
  if (!running_on_cuda() || (qkv.ndim() != 3 && qkv.ndim() != 4) || !cuda_float_dtype(qkv.dtype())) return std::nullopt;
  const int heads = q_heads + 2 * kv_heads;
  const bool split = qkv.ndim() == 4;  // [B, T, heads, D]; else the product's [B, T, heads * D]
  if (split ? qkv.shape(2) != heads : qkv.shape(2) % heads != 0) return std::nullopt;
  const int d = split ? qkv.shape(3) : qkv.shape(2) / heads;
  if (!head_norm_rope_fits(d, qkv.dtype(), rope, norms)) return std::nullopt;
  static auto with_norms =
      cuda_kernel("mlxr_qk_norm_rope", {"qkv", "q_weight", "k_weight", "inverse_frequencies", "offsets"},
                  {"q_out", "k_out", "v_out"}, kQkRope, kCudaHeadNormRope, true, {{"NORM", true}});
  static auto without_norms =
      cuda_kernel("mlxr_qk_rope", {"qkv", "inverse_frequencies", "offsets"}, {"q_out", "k_out", "v_out"}, kQkRope,
                  kCudaHeadNormRope, true, {{"NORM", false}});
  const int b = qkv.shape(0), t = qkv.shape(1);
  const std::vector<mx::Shape> shapes{{b, q_heads, t, d}, {b, kv_heads, t, d}, {b, kv_heads, t, d}};
  const std::vector<mx::Dtype> dtypes{qkv.dtype(), qkv.dtype(), qkv.dtype()};
  const long long items = static_cast<long long>(b) * t * heads;
  const std::tuple<int, int, int> grid{
      cuda_checked_threads((items + kQkHeadsABlock - 1) / kQkHeadsABlock * kQkHeadsABlock * 32), 1, 1};
  const std::tuple<int, int, int> block{kQkHeadsABlock * 32, 1, 1};
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> args{
      {"T", qkv.dtype()}, {"D", d}, {"Q_HEADS", q_heads}, {"KV_HEADS", kv_heads}, {"TRADITIONAL", rope.traditional}};
  std::vector<mx::array> inputs{qkv};
  if (norms) {
    args.emplace_back("EPS_BITS", cuda_float_bits(norms->eps));
    inputs.insert(inputs.end(), {norms->q_weight, norms->k_weight});
  }
  inputs.insert(inputs.end(), {rope.inverse_frequencies, mx::astype(offsets, mx::int32)});
  auto out = (norms ? with_norms : without_norms)(inputs, shapes, dtypes, grid, block, args, std::nullopt, false, {});
  return HeadsFirst{out[0], out[1], out[2]};
}

std::optional<mx::array> cuda_gated_silu_columns(const mx::array& fused, int gate_at, int up_at, int width) {
  if (!running_on_cuda() || !cuda_float_dtype(fused.dtype()) || fused.ndim() < 1 || fused.size() == 0 || width <= 0 ||
      gate_at < 0 || up_at < 0 || gate_at + width > fused.shape(-1) || up_at + width > fused.shape(-1)) {
    return std::nullopt;
  }
  static auto kernel = cuda_kernel("mlxr_gated_silu_columns", {"fused"}, {"out"}, kGatedSiluColumns, kGatedSiluHelpers,
                                   /*ensure_row_contiguous=*/true);
  auto shape = fused.shape();
  shape.back() = width;
  const long long rows = static_cast<long long>(fused.size()) / fused.shape(-1);
  return kernel({fused}, {shape}, {fused.dtype()}, {cuda_checked_threads((rows * width + 255) / 256 * 256), 1, 1},
                {256, 1, 1}, {{"T", fused.dtype()}, {"WIDTH", width}, {"GATE_AT", gate_at}, {"UP_AT", up_at}},
                std::nullopt, false, {})[0];
}

}  // namespace mlxr
