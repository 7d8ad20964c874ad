// Building blocks bound on their own, to check them against NumPy; and QuantSpec, which every network
// that runs packed weights takes (nn/weights.h).
#include <map>
#include <memory>
#include <mutex>

#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "bindings/bindings.h"
#include "bindings/config.h"
#include "nn/activation.h"
#include "nn/attention.h"
#include "nn/cpu_kernels.h"
#include "nn/cuda_argmax.h"
#include "nn/cuda_batch_attention.h"
#include "nn/cuda_decode_attention.h"
#include "nn/cuda_dit_fusion.h"
#include "nn/cuda_host_ints.h"
#include "nn/cuda_kernel_common.h"
#include "nn/cuda_norm_rope.h"
#include "nn/linear.h"
#include "nn/moe.h"
#include "nn/norm.h"
#include "nn/rope.h"

namespace mlxr::bindings {

namespace {

// A gated MLP whose fused gate|up weight W = [G; U] is packed by mx.quantize, to compute its activation alone (its
// down_proj is not used).
GatedMLP packed_gate_up(const mx::array& packed, const mx::array& scales, const std::optional<mx::array>& biases,
                        const QuantSpec& spec) {
  Linear gate_up{.weight = packed, .quantized = Quantized{.scales = scales, .biases = biases, .spec = spec}};
  return GatedMLP{.gate_up_proj = FusedLinear{.layers = {gate_up}},
                  .down_proj = Linear{.weight = mx::array(0.0f)},
                  .intermediate_size = packed.shape(0) / 2};
}

// The decoder's q/k treatment from a binding's arguments: RoPE for heads of `dims` (config.dims when given), and the
// per-head norms when both weights are given; nullopt where the fused CUDA kernels cannot take it (a rotation they do
// not do, one norm weight without the other).
std::optional<std::pair<FusedRope, std::optional<QkNorms>>> qk_treatment(RopeConfig config, int dims,
                                                                         const std::optional<mx::array>& q_weight,
                                                                         const std::optional<mx::array>& k_weight,
                                                                         float eps) {
  if (config.dims == 0) config.dims = dims;
  Rope rope(config);
  if (!rope.fused() || q_weight.has_value() != k_weight.has_value()) return std::nullopt;
  std::optional<QkNorms> norms;
  if (q_weight) norms = QkNorms{*q_weight, *k_weight, eps};
  return std::pair{*rope.fused(), norms};
}

// Products: float and packed weights (nn/linear, nn/moe), and how packed weights are read.
void bind_products(nb::module_& m) {
  bind_config<QuantSpec>(m, "QuantSpec", "How a packed weight was quantized: mx.quantize's bits, group_size, mode.");
  m.def("cuda_runs_packed", &cuda_runs_packed, "columns"_a, "group_size"_a,
        "Whether MLX's CUDA kernels multiply a packed weight of these columns and group size; on CUDA one that they "
        "do not is unpacked at load (nn/weights.h).");
  m.def(
      "mxfp4_blocks",
      [](const mx::array& blocks, const mx::array& scales) -> std::pair<mx::array, std::optional<mx::array>> {
        const WeightMap map{{"w_blocks", blocks}, {"w_scales", scales}};
        const auto& shape = blocks.shape();
        if (shape.size() < 3) throw std::invalid_argument("blocks must be [..., rows, cols / 32, 16]");
        const mx::Shape stack(shape.begin(), shape.end() - 3);
        auto matrix = Weights(map).mxfp4_blocks("w", stack, shape[shape.size() - 3], shape[shape.size() - 2] * 32);
        if (!matrix.quantized) return {evaluated(matrix.weight), std::nullopt};
        return {evaluated(matrix.weight), evaluated(matrix.quantized->scales)};
      },
      "blocks"_a, "scales"_a, nb::call_guard<nb::gil_scoped_release>(),
      "A GPT-OSS checkpoint's MXFP4 *_blocks / *_scales as the loader keeps them: (MLX mxfp4 weight, scales); "
      "on CUDA a shape its kernels lack comes back dequantized, with scales None.");
  m.def(
      "linear",
      [](const mx::array& x, const mx::array& weight, std::optional<mx::array> bias,
         std::optional<std::pair<int, int>> outputs) {
        Linear layer{.weight = weight, .bias = bias};
        return outputs ? layer.outputs(outputs->first, outputs->second)(x) : layer(x);
      },
      "x"_a, "weight"_a, "bias"_a = nb::none(), "outputs"_a = nb::none(),
      "x @ weight.T + bias, weight stored [out, in] as in PyTorch; outputs=(begin, end): those output features only "
      "(Linear::outputs).");
  m.def(
      "quantized_linear",
      [](const mx::array& x, const mx::array& packed, const mx::array& scales, std::optional<mx::array> biases,
         const QuantSpec& spec, std::optional<std::pair<int, int>> outputs) {
        Linear layer{.weight = packed, .quantized = Quantized{.scales = scales, .biases = biases, .spec = spec}};
        return evaluated(outputs ? layer.outputs(outputs->first, outputs->second)(x) : layer(x));
      },
      "x"_a, "packed"_a, "scales"_a, "biases"_a, "spec"_a, "outputs"_a = nb::none(),
      nb::call_guard<nb::gil_scoped_release>(),
      "x @ W.T for W packed by mx.quantize (a Linear's product: on CUDA, a few rows take nn/cuda_matvec); "
      "outputs=(begin, end): those output features only (Linear::outputs).");
  m.def(
      "quantized_gated_silu",
      [](const mx::array& x, const mx::array& packed, const mx::array& scales, std::optional<mx::array> biases,
         const QuantSpec& spec) { return evaluated(packed_gate_up(packed, scales, biases, spec).activated(x)); },
      "x"_a, "packed"_a, "scales"_a, "biases"_a, "spec"_a, nb::call_guard<nb::gil_scoped_release>(),
      "silu(x G^T) * (x U^T) for W = [G; U] packed by mx.quantize (a gated MLP's activation: on CUDA, a few rows "
      "take nn/cuda_matvec's gated kernel).");
  m.def(
      "quantized_normed_product",
      [](const mx::array& x, std::optional<mx::array> delta, const mx::array& norm_weight, float eps,
         const mx::array& packed, const mx::array& scales, std::optional<mx::array> biases, const QuantSpec& spec,
         bool gated) {
        const auto mlp = packed_gate_up(packed, scales, biases, spec);
        const NormInput input{x, delta, norm_weight, eps};
        auto fused = gated ? mlp.normed_activated(input) : mlp.gate_up_proj.normed_product(input);
        if (fused) return std::tuple{evaluated(fused->first), evaluated(fused->second), true};
        const RMSNorm norm{.weight = norm_weight, .eps = eps};
        auto [sum, normed] = delta ? norm.add_then_norm(x, *delta) : std::pair{x, norm(x)};
        auto out = gated ? mlp.activated(normed) : mlp.gate_up_proj(normed);
        return std::tuple{evaluated(sum), evaluated(out), false};
      },
      "x"_a, "delta"_a, "norm_weight"_a, "eps"_a, "packed"_a, "scales"_a, "biases"_a, "spec"_a, "gated"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "(x + delta, the product of RMSNorm(x + delta) with W packed by mx.quantize; gated: silu(gate) * up of W = "
      "[G; U]), and whether one kernel made both (a decoder layer's projection in a decode step on CUDA, "
      "nn/cuda_matvec); no delta: x and the product of RMSNorm(x).");
  m.def(
      "quantized_switch_linear",
      [](const mx::array& x, const mx::array& packed, const mx::array& scales, std::optional<mx::array> biases,
         const mx::array& indices, const QuantSpec& spec, bool sorted) {
        SwitchLinear layer{.weight = packed, .quantized = Quantized{.scales = scales, .biases = biases, .spec = spec}};
        return evaluated(layer(x, indices, sorted));
      },
      "x"_a, "packed"_a, "scales"_a, "biases"_a, "indices"_a, "spec"_a, "sorted"_a = false,
      nb::call_guard<nb::gil_scoped_release>(),
      "A MoE's expert product: x [..., 1, K] times the packed expert weights [E, N, ..] that `indices` pick (as "
      "mx.gather_qmm: on the CPU, affine 4/8-bit weights take nn/cpu_kernels).");
}

// Activations and the softmax (nn/activation, nn/cpu_kernels).
void bind_activations(nb::module_& m) {
  m.def("gelu", [](const mx::array& x) { return gelu(x); }, "x"_a, "Exact (erf) GELU, as torch.nn.functional.gelu.");
  m.def(
      "silu", [](const mx::array& x) { return evaluated(silu(x)); }, "x"_a, nb::call_guard<nb::gil_scoped_release>(),
      "x * sigmoid(x).");
  m.def(
      "gated_silu", [](const mx::array& gate, const mx::array& up) { return evaluated(gated_silu(gate, up)); },
      "gate"_a, "up"_a, nb::call_guard<nb::gil_scoped_release>(), "silu(gate) * up, the gated MLP's activation.");
  m.def(
      "gated_silu_columns",
      [](const mx::array& fused, int gate_at, int up_at, int width) {
        return evaluated(gated_silu_columns(fused, gate_at, up_at, width));
      },
      "fused"_a, "gate_at"_a, "up_at"_a, "width"_a, nb::call_guard<nb::gil_scoped_release>(),
      "silu(gate) * up of the columns [gate_at, gate_at + width) and [up_at, up_at + width) of fused [..., W] (a "
      "fused projection's output), read in place on the CPU.");
  m.def(
      "softmax",
      [](const mx::array& x) { return evaluated(on_cpu_kernels(x) ? softmax_last_axis(x) : mx::softmax(x, -1)); },
      "x"_a, nb::call_guard<nb::gil_scoped_release>(),
      "Softmax over the last axis; float32 on the CPU on every core (nn/cpu_kernels.h).");
}

// Norms, RoPE and the CPU's convolution (nn/norm, nn/rope, nn/cpu_kernels).
void bind_norms_rope_and_convolutions(nb::module_& m) {
  m.def(
      "layer_norm",
      [](const mx::array& x, const mx::array& weight, std::optional<mx::array> bias, float eps) {
        return evaluated(bias ? LayerNorm{.weight = weight, .bias = *bias, .eps = eps}(x)
                              : RMSNorm{.weight = weight, .eps = eps}(x));
      },
      "x"_a, "weight"_a, "bias"_a = nb::none(), "eps"_a = 1e-5f, nb::call_guard<nb::gil_scoped_release>(),
      "LayerNorm over the last axis (nn/norm.h); without bias, RMSNorm.");
  m.def(
      "group_norm",
      [](const mx::array& x, const mx::array& weight, const mx::array& bias, int groups, float eps, bool then_silu) {
        return evaluated(GroupNorm{.weight = weight, .bias = bias, .groups = groups, .eps = eps}(x, then_silu));
      },
      "x"_a, "weight"_a, "bias"_a, "groups"_a, "eps"_a, "then_silu"_a = false, nb::call_guard<nb::gil_scoped_release>(),
      "GroupNorm of x [B, H, W, C] as PyTorch's, then SiLU when then_silu (nn/norm.h).");
  m.def(
      "add_rms_norm",
      [](const mx::array& x, const mx::array& delta, const mx::array& weight, float eps) {
        auto [sum, normed] = RMSNorm{.weight = weight, .eps = eps}.add_then_norm(x, delta);
        return std::pair{evaluated(sum), evaluated(normed)};
      },
      "x"_a, "delta"_a, "weight"_a, "eps"_a = 1e-6f, nb::call_guard<nb::gil_scoped_release>(),
      "(x + delta, RMSNorm of it): a decoder's residual add and the norm after it (one kernel on CUDA).");
  m.def(
      "rope",
      [](const mx::array& x, const RopeConfig& config, int offset) {
        RopeConfig c = config;
        if (c.dims == 0) c.dims = x.shape(-1);
        return evaluated(Rope(c)(x, offset));
      },
      "x"_a, "config"_a, "offset"_a = 0, nb::call_guard<nb::gil_scoped_release>(),
      "A decoder's RoPE on x [B, H, T, D], positions from offset (dims 0: the whole head).");
  m.def(
      "conv2d_cpu",
      [](const mx::array& x, const mx::array& weight, int padding, std::optional<mx::array> bias,
         std::optional<mx::array> residual, bool upsample_2x) {
        if (!on_cpu_kernels(x)) throw std::invalid_argument("conv2d_cpu takes float32 on the CPU");
        return evaluated(
            conv2d_cpu(x, weight, padding, {.bias = bias, .residual = residual, .upsample_2x = upsample_2x}));
      },
      "x"_a, "weight"_a, "padding"_a, "bias"_a = nb::none(), "residual"_a = nb::none(), "upsample_2x"_a = false,
      nb::call_guard<nb::gil_scoped_release>(),
      "The CPU's stride-1 conv2d (x NHWC float32, weight [O, k, k, I]) on every core, then + bias, then residual + "
      "that; upsample_2x reads x upsampled 2x (nearest) first (nn/cpu_kernels.h).");
  m.def(
      "head_norm_rope_cpu",
      [](const mx::array& x, std::optional<mx::array> norm_weight, float eps, const mx::array& cos,
         const mx::array& sin) { return evaluated(head_norm_rope_cpu(x, norm_weight, eps, cos, sin)); },
      "x"_a, "norm_weight"_a, "eps"_a, "cos"_a, "sin"_a, nb::call_guard<nb::gil_scoped_release>(),
      "A DiT's per-head RMSNorm (norm_weight None: none) then RoPE on (even, odd) pairs, x [B, T, H, D] float32 on the "
      "CPU, cos and sin [1 or B, T, 1, D/2] (nn/cpu_kernels.h).");
  m.def(
      "scaled_rms_norm_cpu",
      [](const mx::array& x, const mx::array& norm_weight, float eps, const mx::array& scale) {
        return evaluated(scaled_rms_norm_cpu(x, norm_weight, eps, scale));
      },
      "x"_a, "norm_weight"_a, "eps"_a, "scale"_a, nb::call_guard<nb::gil_scoped_release>(),
      "rms_norm(x) * scale, x [B, T, N] float32 on the CPU, scale [B, 1, N] (nn/cpu_kernels.h).");
  m.def(
      "gated_residual_cpu",
      [](const mx::array& x, const mx::array& a, const mx::array& norm_weight, float eps, const mx::array& gate) {
        return evaluated(gated_residual_cpu(x, a, norm_weight, eps, gate));
      },
      "x"_a, "a"_a, "norm_weight"_a, "eps"_a, "gate"_a, nb::call_guard<nb::gil_scoped_release>(),
      "x + gate * rms_norm(a), x and a [B, T, N] float32 on the CPU, gate [B, 1, N] (nn/cpu_kernels.h).");
  m.def(
      "bias_add_cpu", [](const mx::array& y, const mx::array& bias) { return evaluated(bias_add_cpu(y, bias)); }, "y"_a,
      "bias"_a, nb::call_guard<nb::gil_scoped_release>(),
      "y + bias over y's last axis, float32 on the CPU, on every core (a Linear's bias; nn/cpu_kernels.h).");
  m.def(
      "bias_gelu_cpu", [](const mx::array& y, const mx::array& bias) { return evaluated(bias_gelu_cpu(y, bias)); },
      "y"_a, "bias"_a, nb::call_guard<nb::gil_scoped_release>(),
      "gelu(y + bias), float32 on the CPU, one pass on every core (an encoder's FFN; nn/cpu_kernels.h).");
  m.def(
      "bias_residual_layer_norm_cpu",
      [](const mx::array& y, const mx::array& bias, const mx::array& residual, const mx::array& weight,
         const mx::array& norm_bias,
         float eps) { return evaluated(bias_residual_layer_norm_cpu(y, bias, residual, weight, norm_bias, eps)); },
      "y"_a, "bias"_a, "residual"_a, "weight"_a, "norm_bias"_a, "eps"_a, nb::call_guard<nb::gil_scoped_release>(),
      "layer_norm((y + bias) + residual), float32 on the CPU, one pass on every core (an encoder's post-norm "
      "residual; nn/cpu_kernels.h).");
  m.def(
      "modulated_layer_norm_cpu",
      [](const mx::array& x, const mx::array& shift, const mx::array& one_plus_scale, float eps) {
        return evaluated(modulated_layer_norm_cpu(x, shift, one_plus_scale, eps));
      },
      "x"_a, "shift"_a, "one_plus_scale"_a, "eps"_a, nb::call_guard<nb::gil_scoped_release>(),
      "one_plus_scale * layer_norm(x) + shift, x [B, T, N] float32 on the CPU, the vectors [B, 1, N] (FLUX.2's "
      "modulation; nn/cpu_kernels.h).");
  m.def(
      "gated_sum_cpu",
      [](const mx::array& x, const mx::array& y, const mx::array& gate) {
        return evaluated(gated_sum_cpu(x, y, gate));
      },
      "x"_a, "y"_a, "gate"_a, nb::call_guard<nb::gil_scoped_release>(),
      "x + gate * y, x and y [B, T, N] float32 on the CPU, gate [B, 1, N] (FLUX.2's residual; nn/cpu_kernels.h).");
  m.def(
      "cpu_loops", [] { return std::string(cpu_loops_name()); },
      "The vector loops the CPU kernels run here: 'baseline', 'avx2' or 'avx512' (MLXRUNNER_CPU_LOOPS caps it).");
}

// Attention (nn/attention).
void bind_attention(nb::module_& m) {
  m.def(
      "cuda_batch_decode_attention",
      [](const mx::array& q, const mx::array& keys, const mx::array& values, const mx::array& positions,
         float scale) -> std::optional<mx::array> {
        auto out = cuda_batch_decode_attention(q, keys, values, positions, scale);
        if (!out) return std::nullopt;
        return evaluated(*out);
      },
      "q"_a, "keys"_a, "values"_a, "positions"_a, "scale"_a, nb::call_guard<nb::gil_scoped_release>(),
      "A batch decode step's attention on CUDA: q [B, Hq, 1, D] against a batch cache's buffers [B, Hkv, capacity, "
      "D], row b seeing slots 0..positions[b] -> [B, 1, Hq D]; None off CUDA or where the kernel does not apply "
      "(nn/cuda_batch_attention.h).");
  m.def(
      "attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v, int window, std::optional<float> scale,
         std::optional<mx::array> sinks) {
        return evaluated(window > 0 ? windowed_causal_attention(q, k, v, window, scale, sinks)
                                    : causal_attention(q, k, v, scale, sinks));
      },
      "q"_a, "k"_a, "v"_a, "window"_a = 0, "scale"_a = nb::none(), "sinks"_a = nb::none(),
      nb::call_guard<nb::gil_scoped_release>(),
      "Causal attention over [B, H, L, D] (queries the last Lq of the Lk positions), within a sliding window "
      "when window > 0, with attention sinks [Hq] when given.");
  m.def(
      "masked_attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v, std::optional<mx::array> mask, size_t max_scores) {
        return evaluated(max_scores > 0 ? attention_in_query_bands(q, k, v, max_scores, mask)
                                        : attention(q, k, v, mask));
      },
      "q"_a, "k"_a, "v"_a, "mask"_a = nb::none(), "max_scores"_a = 0, nb::call_guard<nb::gil_scoped_release>(),
      "Attention over [B, H, L, D] with an optional mask as mx.fast.scaled_dot_product_attention takes it (bool: "
      "True attends; float: added to the scores): the encoders' and DiTs' attention. max_scores > 0: in bands of "
      "queries with about that many scores at a time (the VAE's attention).");
  m.def(
      "packed_attention_cpu",
      [](const mx::array& q, const mx::array& k, const mx::array& v, const std::vector<int>& lengths,
         std::optional<float> scale) {
        if (!on_cpu_kernels(q)) throw std::invalid_argument("packed_attention_cpu takes float32 on the CPU");
        return evaluated(packed_attention_cpu(q, k, v, scale_or_default(scale, q), lengths));
      },
      "q"_a, "k"_a, "v"_a, "lengths"_a, "scale"_a = nb::none(), nb::call_guard<nb::gil_scoped_release>(),
      "Attention over sequences packed back to back along the tokens of q [1, Hq, N, D], k and v [1, Hkv, N, D] "
      "(`lengths` summing to N), each sequence attending to itself only (nn/cpu_kernels.h).");
}

// Our CUDA kernels called on their own, and their sources as MLX is handed them (nn/cuda_*).
void bind_cuda_kernels(nb::module_& m) {
  m.def(
      "compact_kernel_source",
      [](const std::string& source, const std::map<std::string, bool>& switches) {
        return compact_kernel_source(source, switches);
      },
      "source"_a, "switches"_a = std::map<std::string, bool>{},
      "A CUDA kernel's source as our kernels hand it to MLX: comments, indentation and blank lines gone, the "
      "`#if NAME` branches of the given switches resolved.");
  m.def("reread_switches", &reread_switches,
        "Make every MLXRUNNER_* switch of the C++ core read its environment variable again at its next use (each is "
        "read once and kept otherwise): a benchmark can then time two settings in one process. Where a caller keeps "
        "what a switch chose (a kernel built once), the change reaches only what is built after it.");
  m.def(
      "switch_value",
      [](const std::string& name, long long unset) {
        // One EnvSwitch a name, kept for the process as the core's own are.
        static std::mutex mutex;
        static std::map<std::string, std::unique_ptr<EnvSwitch>> switches;
        std::lock_guard<std::mutex> lock(mutex);
        auto [at, added] = switches.try_emplace(name);
        if (added) at->second = std::make_unique<EnvSwitch>(at->first.c_str(), unset);  // named by the map's key
        return at->second->number();
      },
      "name"_a, "unset"_a = 0,
      "The number an environment switch of this name holds as the C++ core's switches read it (read at the first "
      "call and kept until reread_switches(); `unset` where it is not set): what a benchmark's process runs under.");
  m.def("kernel_source_included", &kernel_source_included, "source"_a, "inputs"_a = std::vector<std::string>{},
        "What our kernels hand MLX under MLXRUNNER_KERNEL_SOURCES_BY_PATH=1: the line that #includes `source` from a "
        "file of this process's own, after a mention of each input's shape, strides and ndim that it uses.");
  m.def(
      "cuda_int32_from_host",
      [](const std::vector<int>& values) -> std::optional<mx::array> {
        auto out = cuda_int32_from_host(values);
        if (!out) return std::nullopt;
        return evaluated(*out);
      },
      "values"_a, nb::call_guard<nb::gil_scoped_release>(),
      "values as an int32 array [1, n] in device memory, written by a kernel whose parameters carry them "
      "(nn/cuda_host_ints.h: how a prompt's tokens reach the GPU); None off CUDA or for n outside 1..512 "
      "(kMostHostInts).");
  m.def("host_ints_ptx", &host_ints_ptx, "capacity"_a,
        "The PTX of the kernel cuda_int32_from_host launches for up to `capacity` values (nn/cuda_host_ints.h).");
  m.def(
      "cuda_argmax",
      [](const mx::array& z) -> std::optional<mx::array> {
        auto out = cuda_argmax(z);
        if (!out) return std::nullopt;
        return evaluated(*out);
      },
      "z"_a, nb::call_guard<nb::gil_scoped_release>(),
      "Greedy sampling's argmax on CUDA (nn/cuda_argmax.h): the first index of the largest value of z [V] (an int32 "
      "scalar) or of each row of z [rows, V] (int32 [rows]), as mx.argmax; None off CUDA.");
  m.def(
      "cuda_qkv_heads",
      [](const mx::array& qkv, int q_heads, int kv_heads, const RopeConfig& config, const mx::array& offsets,
         std::optional<mx::array> q_weight, std::optional<mx::array> k_weight,
         float eps) -> std::optional<std::tuple<mx::array, mx::array, mx::array>> {
        const int head_dim = qkv.ndim() == 3 ? qkv.shape(-1) / (q_heads + 2 * kv_heads) : qkv.shape(-1);
        auto treatment = qk_treatment(config, head_dim, q_weight, k_weight, eps);
        if (!treatment) return std::nullopt;
        auto out = cuda_qkv_heads(qkv, q_heads, kv_heads, treatment->second, treatment->first, offsets);
        if (!out) return std::nullopt;
        return std::tuple{evaluated(out->q), evaluated(out->k), evaluated(out->v)};
      },
      "qkv"_a, "q_heads"_a, "kv_heads"_a, "config"_a, "offsets"_a, "q_weight"_a = nb::none(), "k_weight"_a = nb::none(),
      "eps"_a = 1e-6f, nb::call_guard<nb::gil_scoped_release>(),
      "The decoder's fused q|k|v kernel on CUDA: per-head RMSNorms (when weights are given) and RoPE at offsets[b] + t "
      "of the query and key heads of qkv [B, T, q_heads + 2 kv_heads, D] (or the product's [B, T, (q_heads + 2 "
      "kv_heads) D]), and its value heads copied -> (q [B, q_heads, T, D], k [B, kv_heads, T, D], v [B, kv_heads, T, "
      "D]); None off CUDA or where the kernel does not apply (nn/cuda_norm_rope.h).");
  // The two attention kernels that write the cache in place share their arguments: (q, k, v, keys, values, position,
  // length, scale) -> the attention, or None where the kernel does not apply.
  using CacheAttention = mx::array (*)(const mx::array&, const mx::array&, const mx::array&, const mx::array&,
                                       const mx::array&, const mx::array&, int, float);
  using Applies = bool (*)(const mx::array&, const mx::array&, const mx::array&);
  auto bind_cache_attention = [&m](const char* name, Applies applies, CacheAttention attention, const char* doc) {
    m.def(
        name,
        [applies, attention](const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys,
                             const mx::array& values, const mx::array& position, int length,
                             float scale) -> std::optional<mx::array> {
          if (!applies(q, k, v)) return std::nullopt;
          return evaluated(attention(q, k, v, keys, values, position, length, scale));
        },
        "q"_a, "k"_a, "v"_a, "keys"_a, "values"_a, "position"_a, "length"_a, "scale"_a,
        nb::call_guard<nb::gil_scoped_release>(), doc);
  };
  bind_cache_attention(
      "cuda_decode_attention", cuda_decode_attention_applies,
      [](const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys, const mx::array& values,
         const mx::array& position, int length,
         float scale) { return cuda_decode_attention(q, k, v, keys, values, position, length, scale); },
      "A decode step's attention on CUDA (nn/cuda_decode_attention.h): writes k and v [1, kv_heads, 1, D] into slot "
      "position[0] of keys and values [1, kv_heads, capacity, D] IN PLACE, and returns softmax(q k^T scale) v over "
      "slots 0..length - 1 as [1, 1, q_heads D]; None off CUDA or where the kernel does not apply.");
  m.def(
      "cuda_decode_attention_roped",
      [](const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& keys, const mx::array& values,
         const mx::array& position, int length, float scale, const RopeConfig& config,
         std::optional<mx::array> q_weight, std::optional<mx::array> k_weight, float eps) -> std::optional<mx::array> {
        auto treatment = qk_treatment(config, q.shape(-1), q_weight, k_weight, eps);
        if (!treatment || !cuda_decode_attention_applies(q, k, v)) return std::nullopt;
        const DecodeRope rope{treatment->first, treatment->second};
        if (!cuda_decode_attention_ropes(q, rope)) return std::nullopt;
        return evaluated(cuda_decode_attention(q, k, v, keys, values, position, length, scale, rope));
      },
      "q"_a, "k"_a, "v"_a, "keys"_a, "values"_a, "position"_a, "length"_a, "scale"_a, "config"_a,
      "q_weight"_a = nb::none(), "k_weight"_a = nb::none(), "eps"_a = 1e-6f, nb::call_guard<nb::gil_scoped_release>(),
      "cuda_decode_attention with q and k as projected: the kernel makes their per-head RMSNorms (when weights are "
      "given) and RoPE at position[0] itself, as cuda_qkv_heads does, and writes the rotated key into the cache; "
      "None off CUDA or where the kernel does not apply (nn/cuda_decode_attention.h).");
  bind_cache_attention(
      "cuda_chunk_attention", cuda_chunk_attention_applies, cuda_chunk_attention,
      "A chunk's attention on CUDA (nn/cuda_decode_attention.h): writes k and v [1, kv_heads, T, D] into slots "
      "position[0] .. position[0] + T - 1 of keys and values [1, kv_heads, capacity, D] IN PLACE, and returns the "
      "causal attention of q [1, q_heads, T, D] (token t at position[0] + t) over slots 0..length - 1 as [1, T, "
      "q_heads D]; "
      "None off CUDA or where the kernel does not apply (2 <= T <= 128); the decoder takes it unless "
      "MLXRUNNER_CHUNK_ATTENTION=0, this binding whatever the switch.");
  m.def(
      "cuda_chunk_attention_from_product",
      [](const mx::array& qkv, int q_heads, int kv_heads, const mx::array& keys, const mx::array& values,
         const mx::array& position, int length, float scale, const RopeConfig& config,
         std::optional<mx::array> q_weight, std::optional<mx::array> k_weight, float eps) -> std::optional<mx::array> {
        if (qkv.ndim() != 3 || q_heads + 2 * kv_heads <= 0 || qkv.shape(2) % (q_heads + 2 * kv_heads) != 0) {
          return std::nullopt;
        }
        auto treatment = qk_treatment(config, qkv.shape(2) / (q_heads + 2 * kv_heads), q_weight, k_weight, eps);
        if (!treatment) return std::nullopt;
        const DecodeRope rope{treatment->first, treatment->second};
        if (!cuda_chunk_product_fits(qkv, q_heads, kv_heads, rope)) return std::nullopt;
        return evaluated(
            cuda_chunk_attention_from_product(qkv, q_heads, kv_heads, keys, values, position, length, scale, rope));
      },
      "qkv"_a, "q_heads"_a, "kv_heads"_a, "keys"_a, "values"_a, "position"_a, "length"_a, "scale"_a, "config"_a,
      "q_weight"_a = nb::none(), "k_weight"_a = nb::none(), "eps"_a = 1e-6f, nb::call_guard<nb::gil_scoped_release>(),
      "cuda_chunk_attention from the q|k|v product [1, T, (q_heads + 2 kv_heads) D] as projected: the kernel reads "
      "each head in place, makes the q/k per-head RMSNorms (when weights are given) and RoPE (token t at position[0] + "
      "t) itself, as cuda_qkv_heads does, and writes the rotated keys and the values into the cache; None off CUDA or "
      "where the kernel does not apply; the decoder takes it unless MLXRUNNER_CHUNK_ROPE=0, this binding whatever the "
      "switch (nn/cuda_decode_attention.h).");
  m.def(
      "cuda_quantized_normed_qkv_heads",
      [](const mx::array& x, std::optional<mx::array> delta, const mx::array& norm_weight, float eps,
         const mx::array& packed, const mx::array& scales, std::optional<mx::array> biases, const QuantSpec& spec,
         int q_heads, int kv_heads, const RopeConfig& config, const mx::array& offsets,
         std::optional<mx::array> q_weight, std::optional<mx::array> k_weight,
         float qk_eps) -> std::optional<std::tuple<mx::array, mx::array, mx::array, mx::array>> {
        auto treatment = qk_treatment(config, packed.shape(0) / (q_heads + 2 * kv_heads), q_weight, k_weight, qk_eps);
        if (!treatment) return std::nullopt;
        const Quantized q{.scales = scales, .biases = biases, .spec = spec};
        auto out = cuda_normed_qkv_heads(NormInput{x, delta, norm_weight, eps}, packed, &q,
                                         HeadSplit{q_heads, kv_heads, treatment->second, treatment->first, offsets});
        if (!out) return std::nullopt;
        return std::tuple{evaluated(out->sum), evaluated(out->q), evaluated(out->k), evaluated(out->v)};
      },
      "x"_a, "delta"_a, "norm_weight"_a, "eps"_a, "packed"_a, "scales"_a, "biases"_a, "spec"_a, "q_heads"_a,
      "kv_heads"_a, "config"_a, "offsets"_a, "q_weight"_a = nb::none(), "k_weight"_a = nb::none(), "qk_eps"_a = 1e-6f,
      nb::call_guard<nb::gil_scoped_release>(),
      "A decode step's q|k|v in one CUDA kernel: RMSNorm(x + delta) (x alone without a delta) times the packed "
      "projection, then the query and key heads' RMSNorms (when weights are given) and RoPE at offsets[b] + t -> (the "
      "sum, q [B, q_heads, T, D], k and v [B, kv_heads, T, D]); x [B, T, K]. None off CUDA or where the kernel does "
      "not apply (nn/cuda_matvec.h).");
  m.def(
      "cuda_head_norm_rope_pairs",
      [](const mx::array& x, const mx::array& cos, const mx::array& sin, std::optional<mx::array> weight,
         float eps) -> std::optional<mx::array> {
        std::optional<RMSNorm> norm;
        if (weight) norm = RMSNorm{.weight = *weight, .eps = eps};
        auto out = cuda_head_norm_rope_pairs(x, norm, cos, sin);
        if (!out) return std::nullopt;
        return evaluated(*out);
      },
      "x"_a, "cos"_a, "sin"_a, "weight"_a = nb::none(), "eps"_a = 1e-6f, nb::call_guard<nb::gil_scoped_release>(),
      "A diffusion transformer's fused q/k kernel on CUDA: per-head RMSNorm (when a weight is given), then RoPE of "
      "adjacent pairs by the angles' cos and sin [1 or B, T, 1, D / 2] of x [B, T, H, D] -> [B, T, H, D]; None off "
      "CUDA or where the kernel does not apply (nn/cuda_dit_fusion.h).");
  m.def(
      "cuda_scaled_rms_norm",
      [](const mx::array& x, const mx::array& weight, float eps, const mx::array& scale) -> std::optional<mx::array> {
        auto out = cuda_scaled_rms_norm(x, RMSNorm{.weight = weight, .eps = eps}, scale);
        if (!out) return std::nullopt;
        return evaluated(*out);
      },
      "x"_a, "weight"_a, "eps"_a, "scale"_a, nb::call_guard<nb::gil_scoped_release>(),
      "rms_norm(x) * scale for x [B, T, N], scale [B, 1, N], one CUDA kernel; None off CUDA or where it does not "
      "apply (nn/cuda_dit_fusion.h).");
  m.def(
      "cuda_gated_residual",
      [](const mx::array& x, const mx::array& a, const mx::array& a_weight, float eps, const mx::array& gate,
         std::optional<mx::array> next_weight, float next_eps,
         std::optional<mx::array> next_scale) -> std::optional<std::pair<mx::array, std::optional<mx::array>>> {
        if (next_weight.has_value() != next_scale.has_value()) {
          throw std::invalid_argument("next_weight and next_scale come together");
        }
        const RMSNorm a_norm{.weight = a_weight, .eps = eps};
        std::optional<RMSNorm> next_norm;
        std::optional<NextNorm> next;
        if (next_weight) {
          next_norm = RMSNorm{.weight = *next_weight, .eps = next_eps};
          next.emplace(NextNorm{*next_norm, *next_scale});
        }
        auto out = cuda_gated_residual(x, a, a_norm, gate, next);
        if (!out) return std::nullopt;
        std::optional<mx::array> second;
        if (out->second) second = evaluated(*out->second);
        return std::pair{evaluated(out->first), second};
      },
      "x"_a, "a"_a, "a_weight"_a, "eps"_a, "gate"_a, "next_weight"_a = nb::none(), "next_eps"_a = 1e-6f,
      "next_scale"_a = nb::none(), nb::call_guard<nb::gil_scoped_release>(),
      "(x + gate * rms_norm(a), and with next_weight rms_norm of that * next_scale) for x, a [B, T, N], gate and "
      "next_scale [B, 1, N], one CUDA kernel; None off CUDA or where it does not apply (nn/cuda_dit_fusion.h).");
  m.def(
      "cuda_modulated_layer_norm",
      [](const mx::array& x, const mx::array& shift, const mx::array& one_plus_scale, float eps,
         std::optional<mx::array> y, std::optional<mx::array> gate) -> std::optional<std::pair<mx::array, mx::array>> {
        if (y.has_value() != gate.has_value()) throw std::invalid_argument("y and gate come together");
        std::optional<GatedTerm> residual;
        if (y) residual.emplace(GatedTerm{*y, *gate});
        auto out = cuda_gated_residual_modulated_layer_norm(x, residual, shift, one_plus_scale, eps);
        if (!out) return std::nullopt;
        return std::pair{evaluated(out->first), evaluated(out->second)};
      },
      "x"_a, "shift"_a, "one_plus_scale"_a, "eps"_a = 1e-6f, "y"_a = nb::none(), "gate"_a = nb::none(),
      nb::call_guard<nb::gil_scoped_release>(),
      "FLUX.2's modulation on CUDA: h = x (+ gate * y when given), then (h, layer_norm(h) * one_plus_scale + shift) "
      "for x, y [B, T, N], the vectors [B, 1, N]; None off CUDA or where it does not apply (nn/cuda_dit_fusion.h).");
}

}  // namespace

void bind_building_blocks(nb::module_& m) {
  bind_products(m);
  bind_activations(m);
  bind_norms_rope_and_convolutions(m);
  bind_attention(m);
  bind_cuda_kernels(m);
}

}  // namespace mlxr::bindings
