#include "nn/linear.h"

#include "nn/cpu_kernels.h"
#include "nn/cuda_kernel_common.h"
#include "nn/cuda_matvec.h"
#include "nn/slicing.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

namespace mlxr {

namespace {

// `y` times the weight's global scale, if it has one (in y's dtype, so the result keeps it).
mx::array scaled(const mx::array& y, const Quantized& q) {
  return q.global_scale ? mx::multiply(y, mx::astype(*q.global_scale, y.dtype())) : y;
}

// MLX 0.32.4's CUDA kernels for affine 2/3-bit weights in groups of 128 fail on float32 activations once
// 33 or more rows are in flight (a kernel launch error); bfloat16 activations run at every size. Such layers
// take their input in bfloat16 there (what real checkpoints compute in anyway) and give float32 back.
bool needs_bf16_activations(const mx::array& x, const QuantSpec& spec) {
  return x.dtype() == mx::float32 && spec.mode == "affine" && spec.group_size == 128 &&
         (spec.bits == 2 || spec.bits == 3) && running_on_cuda();
}

// MLX 0.32.4 sends a packed affine 4/8-bit weight whose rows are a single group (columns <= group size) to
// its Hopper kernel, which multiplies such weights wrongly (an H200: off by the whole output, at one row of a
// 40,000-row head and at 16+ rows of a 48-row layer; tests/gpu/test_quant_backends.py). Real checkpoints have
// no such layers, tiny test models do: there they multiply the dequantized weight (a small one; it stays
// packed in memory).
bool single_group_rows_on_cuda(const mx::array& packed, const QuantSpec& spec) {
  const int64_t cols = static_cast<int64_t>(packed.shape(-1)) * 32 / spec.bits;
  return spec.mode == "affine" && (spec.bits == 4 || spec.bits == 8) && cols <= spec.group_size && running_on_cuda();
}

// MLX 0.32's CPU quantized_matmul multiplies one row of x at a time on one thread, so its time grows with the rows
// (a 4,096 x 1,024 4-bit weight: 3.8 ms at 1 row, 241 ms at 64, 998 ms at 256), where the dequantized weight through
// the float product on every core stays nearly flat (12-31 ms, mostly the dequantize): a quantized image model's
// 256-row products made its images 35x slower than the float model's. From this many rows on, the CPU multiplies
// the dequantized weight (a transient float copy of one layer's weight at a time).
constexpr int64_t kCpuDequantizedRows = 4;
// Below this many rows, affine 4/8-bit weights take our CPU kernel instead (affine_matvec_cpu, every core: ~0.2 ms a
// row for that weight, so it beats the dequantized product up to ~50 rows; MLX's kernel below 4 rows took 3.8 ms).
constexpr int64_t kCpuAffineKernelRows = 32;
// Below this many rows a half-precision weight takes our CPU kernel (half_matvec_cpu); from here on a float32 copy's
// BLAS product, whose copy costs about what 32 rows' worth of the kernel's multiply-adds do.
constexpr int64_t kCpuHalfKernelRows = 32;

// MLX 0.32.4's CUDA quantized_matmul for many rows is a tiled kernel far from cuBLAS's products: a quantized
// Z-Image (4,128-row products) made its images 3x slower than the float model's on an H200 (2.83 s at 8 bits, 3.28 s
// at 4 bits, 0.955 s in bf16). From this many rows on, CUDA also multiplies the dequantized weight (a transient
// float copy of one layer's weight; reading it back costs less than the product saves). The crossover was measured
// with benchmarks/gpu/qmm_bench.py (benchmarks/README.md, "Quantized products of many rows").
constexpr int64_t kCudaDequantizedRows = 512;

// x times the dequantized W^T, in x's dtype (the weight stays packed in memory; this copy is transient).
mx::array dequantized_matmul(const mx::array& x, const mx::array& packed, const Quantized& q) {
  const auto& spec = q.spec;
  auto weight = mx::dequantize(packed, q.scales, q.biases, spec.group_size, spec.bits, spec.mode);
  return scaled(mx::matmul(x, mx::transpose(mx::astype(weight, x.dtype()))), q);
}

// x W^T for a packed W (transpose=true: W is stored [out, in] like a float weight).
mx::array quantized_matmul(const mx::array& x, const mx::array& packed, const Quantized& q) {
  const auto& spec = q.spec;
  if (spec.mode == "affine" && q.biases && rows_of(x) < kCpuAffineKernelRows) {  // on the CPU, on every core
    if (auto y = affine_matvec_cpu(x, packed, q.scales, *q.biases, spec.bits, spec.group_size)) return *y;
  }
  if (multiplies_dequantized(x)) return dequantized_matmul(x, packed, q);
  if (needs_bf16_activations(x, spec)) {
    // MLX promotes to the scales' dtype, so they (small: one per group) go to bfloat16 with the input.
    auto bf16 = [](const mx::array& a) { return mx::astype(a, mx::bfloat16); };
    std::optional<mx::array> biases;
    if (q.biases) biases = bf16(*q.biases);
    auto y = mx::quantized_matmul(bf16(x), packed, bf16(q.scales), biases, true, spec.group_size, spec.bits, spec.mode);
    return scaled(mx::astype(y, mx::float32), q);
  }
  if (auto y = cuda_matvec(x, packed, &q)) return *y;
  if (single_group_rows_on_cuda(packed, spec)) return dequantized_matmul(x, packed, q);
  return scaled(mx::quantized_matmul(x, packed, q.scales, q.biases, true, spec.group_size, spec.bits, spec.mode), q);
}

// x W^T for a float W [out, in]: transpose is a view, matmul reads W with swapped strides (no copy). A half-precision
// W on the CPU, where MLX has no BLAS path for it (a 300 MB bf16 model's 512-token prefill took 24 s, its decode 7
// tokens a second): a few rows take our kernel (half_matvec_cpu), more multiply a transient float32 copy through BLAS.
mx::array float_matmul(const mx::array& x, const mx::array& weight, const std::optional<mx::array>& transposed) {
  if (half_precision(weight.dtype()) && mx::default_device() == mx::Device::cpu) {
    if (rows_of(x) < kCpuHalfKernelRows) {
      if (auto y = half_matvec_cpu(x, weight)) return *y;
    }
    auto product = mx::matmul(mx::astype(x, mx::float32), mx::transpose(widened_to_float32(weight)));
    return mx::astype(product, x.dtype());
  }
  if (auto y = cuda_matvec(x, weight, nullptr)) return *y;  // a decode step, under MLXRUNNER_HALF_MATVEC=1
  return mx::matmul(x, transposed ? *transposed : mx::transpose(weight));
}

// `transposed` if it is still the [in, out] view of `weight`'s buffer (both evaluated); nullopt otherwise, and while
// either is lazy (before the model's weights are evaluated).
std::optional<mx::array> view_of(const std::optional<mx::array>& transposed, const mx::array& weight) {
  if (!transposed || !transposed->is_available() || !weight.is_available() || weight.ndim() != 2 ||
      transposed->ndim() != 2 || transposed->shape(0) != weight.shape(1) || transposed->shape(1) != weight.shape(0)) {
    return std::nullopt;
  }
  if (transposed->data<char>() != weight.data<char>()) return std::nullopt;
  return transposed;
}

std::vector<mx::array> with_companions(const mx::array& weight, const std::optional<Quantized>& q) {
  std::vector<mx::array> out{weight};
  if (q) {
    out.push_back(q->scales);
    if (q->biases) out.push_back(*q->biases);
    if (q->global_scale) out.push_back(*q->global_scale);
  }
  return out;
}

}  // namespace

bool multiplies_dequantized(const mx::array& x) {
  if (on_cpu_kernels(x)) return rows_of(x) >= kCpuDequantizedRows;
  return running_on_cuda() && rows_of(x) >= kCudaDequantizedRows;
}

Linear Linear::load(const Weights& w, int in_features, int out_features, bool with_bias) {
  auto matrix = w.matrix("weight", out_features, in_features);
  Linear out{.weight = matrix.weight,
             .bias = with_bias ? std::optional<mx::array>(w.get("bias", {out_features})) : std::nullopt,
             .quantized = matrix.quantized};
  if (!out.quantized) out.transposed = mx::transpose(out.weight);
  return out;
}

bool Linear::can_concat(const Linear& a, const Linear& b) {
  if (a.bias.has_value() != b.bias.has_value() || a.quantized.has_value() != b.quantized.has_value()) return false;
  if (!a.quantized) return a.weight.dtype() == b.weight.dtype();
  // Parts with their own global scales would need a scale per output column: they run apart.
  if (a.quantized->global_scale || b.quantized->global_scale) return false;
  return a.quantized->spec == b.quantized->spec && a.quantized->scales.dtype() == b.quantized->scales.dtype();
}

Linear Linear::concat(const std::vector<Linear>& parts) {
  for (size_t i = 1; i < parts.size(); ++i) {
    if (!can_concat(parts[0], parts[i])) {
      throw std::invalid_argument("Linear::concat: the parts differ in bias, dtype or quantization");
    }
  }
  auto joined = [&](auto member) {
    std::vector<mx::array> arrays;
    for (const auto& part : parts) arrays.push_back(member(part));
    return mx::concatenate(arrays, 0);
  };
  Linear out{.weight = joined([](const Linear& l) { return l.weight; })};
  if (parts[0].bias) out.bias = joined([](const Linear& l) { return *l.bias; });
  if (parts[0].quantized) {
    // Packed rows are independent (groups run along a row), so stacking rows of weights, scales and
    // biases quantizes the stacked matrix exactly as its parts were.
    out.quantized = Quantized{.scales = joined([](const Linear& l) { return l.quantized->scales; }),
                              .spec = parts[0].quantized->spec};
    if (parts[0].quantized->biases) {
      out.quantized->biases = joined([](const Linear& l) { return *l.quantized->biases; });
    }
  } else {
    out.transposed = mx::transpose(out.weight);
  }
  return out;
}

Linear Linear::outputs(int begin, int end) const {
  if (begin < 0 || end > out_features() || begin >= end) {
    throw std::invalid_argument("Linear::outputs: [" + std::to_string(begin) + ", " + std::to_string(end) +
                                ") is not a range of the layer's " + std::to_string(out_features()) + " outputs");
  }
  auto rows = [&](const mx::array& a) { return axis_slice(a, 0, begin, end); };
  Linear out{.weight = rows(weight)};
  if (bias) out.bias = rows(*bias);
  if (quantized) {
    out.quantized = *quantized;
    out.quantized->scales = rows(quantized->scales);
    if (quantized->biases) out.quantized->biases = rows(*quantized->biases);
  }
  return out;
}

mx::array Linear::product(const mx::array& x) const {
  return quantized ? quantized_matmul(x, weight, *quantized) : float_matmul(x, weight, view_of(transposed, weight));
}

mx::array Linear::operator()(const mx::array& x) const {
  auto y = product(x);
  if (!bias) return y;
  // MLX adds on one CPU thread; ours on every core, the same numbers.
  if (on_cpu_kernels(y) && bias->dtype() == mx::float32 && bias->ndim() == 1) return bias_add_cpu(y, *bias);
  return mx::add(y, *bias);
}

mx::Dtype Linear::dtype() const {
  if (!quantized) return weight.dtype();
  return quantized->spec.mode == "affine" ? quantized->scales.dtype() : mx::bfloat16;
}

std::vector<mx::array> Linear::arrays() const {
  auto out = with_companions(weight, quantized);
  if (bias) out.push_back(*bias);
  if (transposed) out.push_back(*transposed);  // a view: evaluating it takes no memory
  return out;
}

FusedLinear FusedLinear::fuse(const std::vector<Linear>& parts) {
  std::vector<std::vector<Linear>> runs;
  for (const auto& part : parts) {
    if (runs.empty() || !Linear::can_concat(runs.back().back(), part)) runs.emplace_back();
    runs.back().push_back(part);
  }
  FusedLinear out;
  for (const auto& run : runs) out.layers.push_back(run.size() == 1 ? run[0] : Linear::concat(run));
  return out;
}

std::vector<mx::array> FusedLinear::part_outputs(const mx::array& x, const std::vector<int>& widths) const {
  std::vector<mx::array> out;
  size_t part = 0;
  for (const auto& layer : layers) {
    auto y = layer(x);
    // The parts this layer computes, side by side.
    mx::Shape cuts;
    int covered = 0;
    while (part < widths.size() && covered + widths[part] <= layer.out_features()) {
      covered += widths[part++];
      if (covered < layer.out_features()) cuts.push_back(covered);
    }
    if (covered != layer.out_features()) throw std::invalid_argument("FusedLinear: widths do not match its layers");
    if (cuts.empty()) {
      out.push_back(y);
    } else {
      for (auto& piece : mx::split(y, cuts, -1)) out.push_back(piece);
    }
  }
  if (part != widths.size()) throw std::invalid_argument("FusedLinear: widths do not match its layers");
  return out;
}

mx::array FusedLinear::operator()(const mx::array& x) const {
  if (layers.size() == 1) return layers[0](x);
  std::vector<mx::array> outputs;
  for (const auto& layer : layers) outputs.push_back(layer(x));
  return mx::concatenate(outputs, -1);
}

const Linear* FusedLinear::alone() const {
  return layers.size() == 1 && !layers[0].bias ? &layers[0] : nullptr;
}

std::optional<std::pair<mx::array, mx::array>> FusedLinear::normed_product(const NormInput& input) const {
  const auto* layer = alone();
  if (!layer) return std::nullopt;
  return cuda_normed_matvec(input, layer->weight, layer->packing(), /*gated=*/false);
}

std::optional<QkvHeads> FusedLinear::normed_heads(const NormInput& input, const HeadSplit& split) const {
  const auto* layer = alone();
  if (!layer) return std::nullopt;
  return cuda_normed_qkv_heads(input, layer->weight, layer->packing(), split);
}

std::vector<mx::array> FusedLinear::arrays() const {
  std::vector<mx::array> out;
  for (const auto& layer : layers) {
    auto arrays = layer.arrays();
    out.insert(out.end(), arrays.begin(), arrays.end());
  }
  return out;
}

Embedding Embedding::load(const Weights& w, int num_embeddings, int dims) {
  auto matrix = w.matrix("weight", num_embeddings, dims);
  Embedding out{.weight = matrix.weight, .quantized = matrix.quantized};
  if (!out.quantized) out.transposed = mx::transpose(out.weight);
  return out;
}

mx::array Embedding::operator()(const mx::array& ids) const {
  auto rows = mx::take(weight, ids, 0);
  if (!quantized) return rows;
  // Gather the packed rows first and dequantize only those (mlx.nn.QuantizedEmbedding does the same,
  // and so gives the same dtype: the scales' for affine, bfloat16 for the microscaled modes).
  const auto& q = *quantized;
  std::optional<mx::array> biases;
  if (q.biases) biases = mx::take(*q.biases, ids, 0);
  // With a global scale the rows come back float32: a bfloat16 value times a float32 scale is seldom a
  // bfloat16 value, and the table holds the products.
  std::optional<mx::Dtype> dtype;
  if (q.global_scale) dtype = mx::float32;
  return scaled(mx::dequantize(rows, mx::take(q.scales, ids, 0), biases, q.spec.group_size, q.spec.bits, q.spec.mode,
                               std::nullopt, dtype),
                q);
}

mx::array Embedding::as_linear(const mx::array& x) const {
  return quantized ? quantized_matmul(x, weight, *quantized) : float_matmul(x, weight, view_of(transposed, weight));
}

std::vector<mx::array> Embedding::arrays() const {
  auto out = with_companions(weight, quantized);
  if (transposed) out.push_back(*transposed);  // a view: evaluating it takes no memory
  return out;
}

}  // namespace mlxr
