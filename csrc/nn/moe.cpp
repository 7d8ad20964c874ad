#include "nn/moe.h"

#include <limits>
#include <stdexcept>

#include "nn/activation.h"
#include "nn/cpu_kernels.h"
#include "nn/cuda_matvec.h"
#include "nn/slicing.h"

namespace mlxr {

namespace {

// From this many (token, expert) pairs on, sorting them by expert pays for itself: each expert's
// matrices are then read once for a contiguous run of rows (mlx-lm's threshold).
constexpr int kSortFrom = 64;

SwitchLinear from_matrix(Matrix m, std::optional<mx::array> bias = std::nullopt) {
  return SwitchLinear{.weight = m.weight, .quantized = m.quantized, .bias = bias};
}

// Every other row of stacked [E, rows, cols] matrices (packed ones with their scales), from `first`:
// GPT-OSS interleaves its gate (even) and up (odd) outputs.
mx::array every_other_row(const mx::array& stacked, int first) {
  return mx::contiguous(mx::slice(stacked, {0, first, 0}, stacked.shape(), {1, 2, 1}));
}

Matrix every_other_row(const Matrix& m, int first) {
  Matrix out{every_other_row(m.weight, first), m.quantized};
  if (m.quantized) {
    out.quantized->scales = every_other_row(m.quantized->scales, first);
    if (m.quantized->biases) out.quantized->biases = every_other_row(*m.quantized->biases, first);
  }
  return out;
}

// Every other column of a bias [E, 2 I], from `first`.
mx::array every_other_column(const mx::array& bias, int first) {
  return mx::contiguous(mx::slice(bias, {0, first}, bias.shape(), {1, 2}));
}

// GPT-OSS's experts as transformers saves them (SwitchGLU::load lists the layouts): float [E, in, out]
// (transposed here to [E, out, in]) or MXFP4 blocks [E, out, in], gate and up interleaved, with biases.
SwitchGLU gpt_oss_experts(const Weights& experts, int e, int h, int f) {
  const bool mxfp4 = experts.has("gate_up_proj_blocks");
  auto matrix = [&](const std::string& name, int out, int in) {
    if (mxfp4) return experts.mxfp4_blocks(name, {e}, out, in);
    return Matrix{mx::swapaxes(experts.get(name, {e, in, out}), 1, 2), std::nullopt};
  };
  auto gate_up = matrix("gate_up_proj", 2 * f, h);
  auto gate_up_bias = experts.get("gate_up_proj_bias", {e, 2 * f});
  auto down = matrix("down_proj", h, f);
  if (!mxfp4) down.weight = mx::contiguous(down.weight);
  return SwitchGLU{
      .gate_proj = from_matrix(every_other_row(gate_up, 0), every_other_column(gate_up_bias, 0)),
      .up_proj = from_matrix(every_other_row(gate_up, 1), every_other_column(gate_up_bias, 1)),
      .down_proj = from_matrix(down, experts.get("down_proj_bias", {e, h})),
  };
}

// experts.{i}.<proj>.weight, one [out, in] matrix per expert, stacked. Packed experts stack their
// packed rows, scales and biases alike, so they must all be quantized the same way; nvfp4 experts with
// global scales (Ollama's packed expert blobs) stack those into one per expert, [E].
SwitchLinear stack_experts(const Weights& w, const std::string& proj, int experts, int in, int out) {
  std::vector<mx::array> weights, scales, biases, global_scales;
  std::optional<QuantSpec> spec;
  for (int i = 0; i < experts; ++i) {
    const std::string name = "experts." + std::to_string(i) + "." + proj + ".weight";
    auto m = w.matrix(name, out, in);
    const std::optional<QuantSpec> this_spec = m.quantized ? std::optional(m.quantized->spec) : std::nullopt;
    const bool scaled = m.quantized && m.quantized->global_scale;
    if (i > 0 && (this_spec != spec || scaled != !global_scales.empty())) {
      throw std::invalid_argument("weight " + w.full_name(name) + " is quantized unlike expert 0's " + proj +
                                  "; a layer's experts must share one format");
    }
    spec = this_spec;
    weights.push_back(m.weight);
    if (m.quantized) {
      scales.push_back(m.quantized->scales);
      if (m.quantized->biases) biases.push_back(*m.quantized->biases);
      if (scaled) global_scales.push_back(*m.quantized->global_scale);
    }
  }
  SwitchLinear out_linear{.weight = mx::stack(weights, 0)};
  if (spec) {
    out_linear.quantized = Quantized{.scales = mx::stack(scales, 0), .spec = *spec};
    if (!biases.empty()) out_linear.quantized->biases = mx::stack(biases, 0);
    if (!global_scales.empty()) out_linear.quantized->global_scale = mx::stack(global_scales, 0);
  }
  return out_linear;
}

// Rows [first, first + count) of each expert's [E, rows, cols] matrix.
mx::array expert_rows(const mx::array& stacked, int first, int count) {
  return mx::slice(stacked, {0, first, 0}, {stacked.shape(0), first + count, stacked.shape(2)});
}

// The experts' three projections in whichever spelling the checkpoint uses (SwitchGLU::load lists them).
SwitchGLU expert_projections(const Weights& w, int e, int h, int f) {
  for (const std::string stacked_prefix : {"switch_mlp", "experts"}) {
    if (!w.has(stacked_prefix + ".gate_proj.weight")) continue;
    auto stacked = w.sub(stacked_prefix);
    auto proj = [&](const std::string& name, int out, int in) {
      return from_matrix(stacked.stacked_matrix(name + ".weight", {e}, out, in),
                         stacked.maybe(name + ".bias", {e, out}));
    };
    return SwitchGLU{
        .gate_proj = proj("gate_proj", f, h), .up_proj = proj("up_proj", f, h), .down_proj = proj("down_proj", h, f)};
  }
  // GPT-OSS's fused experts always carry biases; Qwen3-MoE's (transformers 5) never do.
  if (w.has("experts.gate_up_proj_bias")) return gpt_oss_experts(w.sub("experts"), e, h, f);
  if (w.has("experts.gate_up_proj")) {
    // transformers 5 keeps experts fused: gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F].
    auto gate_up = w.get("experts.gate_up_proj", {e, 2 * f, h});
    return SwitchGLU{
        .gate_proj = SwitchLinear{.weight = expert_rows(gate_up, 0, f)},
        .up_proj = SwitchLinear{.weight = expert_rows(gate_up, f, f)},
        .down_proj = SwitchLinear{.weight = w.get("experts.down_proj", {e, h, f})},
    };
  }
  return SwitchGLU{
      .gate_proj = stack_experts(w, "gate_proj", e, h, f),
      .up_proj = stack_experts(w, "up_proj", e, h, f),
      .down_proj = stack_experts(w, "down_proj", e, f, h),
  };
}

}  // namespace

void check_moe_config(const MoeConfig& c) {
  auto fail = [](const std::string& message) { throw std::invalid_argument("config: " + message); };
  if (c.num_experts <= 0) return;
  if (c.num_experts_per_tok <= 0 || c.num_experts_per_tok > c.num_experts) {
    fail("num_experts_per_tok must be between 1 and the number of experts (" + std::to_string(c.num_experts) + ")");
  }
  if (c.moe_intermediate_size <= 0) fail("moe_intermediate_size must be positive");
  if (c.scoring_func != "softmax" && c.scoring_func != "sigmoid" && c.scoring_func != "topk_softmax") {
    fail("scoring_func '" + c.scoring_func + "' is not supported (softmax, sigmoid, topk_softmax)");
  }
  if (c.expert_activation != "silu" && c.expert_activation != "swiglu_oai") {
    fail("expert_activation '" + c.expert_activation + "' is not supported (silu, swiglu_oai)");
  }
  if (c.n_group <= 0 || c.num_experts % c.n_group != 0) {
    fail("n_group " + std::to_string(c.n_group) + " does not divide the " + std::to_string(c.num_experts) + " experts");
  }
  if (c.n_group > 1 && c.num_experts / c.n_group < 2) fail("each of the n_group expert groups needs 2 experts");
  if (c.topk_group <= 0 || c.topk_group > c.n_group) fail("topk_group must be between 1 and n_group");
  if (c.n_shared_experts < 0) fail("n_shared_experts must not be negative");
}

GatedMLP GatedMLP::load(const Weights& w, int hidden_size, int intermediate_size, bool with_bias,
                        const std::string& activation) {
  return GatedMLP{
      .gate_up_proj = FusedLinear::fuse({Linear::load(w.sub("gate_proj"), hidden_size, intermediate_size, with_bias),
                                         Linear::load(w.sub("up_proj"), hidden_size, intermediate_size, with_bias)}),
      .down_proj = Linear::load(w.sub("down_proj"), intermediate_size, hidden_size, with_bias),
      .intermediate_size = intermediate_size,
      .activation = activation,
  };
}

mx::array GatedMLP::operator()(const mx::array& x) const {
  return down_proj(activated(x));
}

mx::array GatedMLP::activated(const mx::array& x) const {
  if (const auto* gate_up = silu_gate_up_alone()) {
    if (auto fused = cuda_swiglu_matvec(x, gate_up->weight, gate_up->packing())) return *fused;
  }
  auto gate_up = gate_up_proj(x);  // [..., 2 F]: gate | up
  if (activation == "silu") return gated_silu_columns(gate_up, 0, intermediate_size, intermediate_size);
  auto gate = axis_slice(gate_up, -1, 0, intermediate_size);
  auto up = axis_slice(gate_up, -1, intermediate_size, 2 * intermediate_size);
  return mx::multiply(mlxr::activation(activation, gate), up);
}

std::optional<std::pair<mx::array, mx::array>> GatedMLP::normed_activated(const NormInput& input) const {
  const auto* gate_up = silu_gate_up_alone();
  if (!gate_up) return std::nullopt;
  return cuda_normed_matvec(input, gate_up->weight, gate_up->packing(), /*gated=*/true);
}

// A decode step's silu(gate) * up can come from the product's own kernel on CUDA (nn/cuda_matvec.h): one operation a
// layer fewer, where a decode step is bound by MLX's cost per operation; the same numbers.
const Linear* GatedMLP::silu_gate_up_alone() const {
  return activation == "silu" ? gate_up_proj.alone() : nullptr;
}

std::vector<mx::array> GatedMLP::arrays() const {
  auto out = gate_up_proj.arrays();
  auto down = down_proj.arrays();
  out.insert(out.end(), down.begin(), down.end());
  return out;
}

mx::array SwitchLinear::product(const mx::array& x, const mx::array& indices, bool sorted) const {
  if (!quantized) return mx::gather_mm(x, mx::swapaxes(weight, -1, -2), std::nullopt, indices, sorted);
  const auto& spec = quantized->spec;
  if (spec.mode == "affine" && quantized->biases) {  // on the CPU, on every core (MLX's kernel: one term at a time)
    if (auto y = gather_affine_matvec_cpu(x, weight, quantized->scales, *quantized->biases, indices, spec.bits,
                                          spec.group_size)) {
      return *y;
    }
  }
  return mx::gather_qmm(x, weight, quantized->scales, quantized->biases, std::nullopt, indices, true, spec.group_size,
                        spec.bits, spec.mode, std::nullopt, sorted);
}

mx::array SwitchLinear::operator()(const mx::array& x, const mx::array& indices, bool sorted) const {
  mx::array y = product(x, indices, sorted);
  if (quantized && quantized->global_scale) {
    // nvfp4: each row's product times its expert's global scale (nn/weights.h says why after the matmul).
    auto per_row = mx::take(*quantized->global_scale, indices, 0);
    y = mx::multiply(y, mx::astype(mx::expand_dims(per_row, {-1, -2}), y.dtype()));
  }
  if (!bias) return y;
  // y [..., 1, out]: each row's expert bias [..., out], put in front of the row axis.
  return mx::add(y, mx::expand_dims(mx::take(*bias, indices, 0), -2));
}

std::vector<mx::array> SwitchLinear::arrays() const {
  std::vector<mx::array> out{weight};
  if (quantized) {
    out.push_back(quantized->scales);
    if (quantized->biases) out.push_back(*quantized->biases);
    if (quantized->global_scale) out.push_back(*quantized->global_scale);
  }
  if (bias) out.push_back(*bias);
  return out;
}

SwitchGLU SwitchGLU::load(const Weights& w, int hidden_size, const MoeConfig& config) {
  SwitchGLU glu = expert_projections(w, config.num_experts, hidden_size, config.moe_intermediate_size);
  glu.config = config;
  return glu;
}

mx::array SwitchGLU::activate(const mx::array& gate, const mx::array& up) const {
  if (config.expert_activation == "silu") return gated_silu(gate, up);
  auto limit = mx::array(config.swiglu_limit, gate.dtype());
  auto clamped_gate = mx::minimum(gate, limit);
  auto clamped_up = mx::clip(up, mx::negative(limit), limit);
  auto glu =
      mx::multiply(clamped_gate, mx::sigmoid(mx::multiply(clamped_gate, mx::array(config.swiglu_alpha, gate.dtype()))));
  return mx::multiply(mx::add(clamped_up, mx::array(1.0f, up.dtype())), glu);
}

mx::array SwitchGLU::operator()(const mx::array& x, const mx::array& indices) const {
  const int n = x.shape(0), k = indices.shape(1), h = x.shape(1);
  if (indices.size() < kSortFrom) {
    // x [N, 1, 1, H] against indices [N, k]: gather_mm broadcasts each token over its k experts.
    auto rows = mx::reshape(x, {n, 1, 1, h});
    auto hidden = activate(gate_proj(rows, indices, false), up_proj(rows, indices, false));
    return mx::squeeze(down_proj(hidden, indices, false), -2);  // [N, k, H]
  }
  // One row per (token, expert) pair, ordered by expert; the inverse order puts the results back.
  auto flat = mx::flatten(indices);
  auto order = mx::argsort(flat);
  auto inverse = mx::argsort(order);
  auto rows = mx::take(mx::reshape(x, {n, 1, h}), mx::floor_divide(order, mx::array(k, order.dtype())), 0);
  auto sorted = mx::take(flat, order, 0);
  auto hidden = activate(gate_proj(rows, sorted, true), up_proj(rows, sorted, true));
  auto out = mx::take(down_proj(hidden, sorted, true), inverse, 0);  // [N k, 1, H]
  return mx::reshape(out, {n, k, h});
}

std::vector<mx::array> SwitchGLU::arrays() const {
  std::vector<mx::array> out;
  for (const auto* part : {&gate_proj, &up_proj, &down_proj}) {
    auto arrays = part->arrays();
    out.insert(out.end(), arrays.begin(), arrays.end());
  }
  return out;
}

std::pair<mx::array, mx::array> Router::operator()(const mx::array& x) const {
  const int k = config.num_experts_per_tok;
  auto kept = [&](const mx::array& choice) {  // indices of the k largest, in no order
    return axis_slice(mx::argpartition(mx::negative(choice), k - 1, -1), -1, 0, k);
  };
  if (config.scoring_func == "topk_softmax") {
    // GPT-OSS: the k largest logits, softmaxed among themselves (in float32).
    auto logits = mx::astype(gate(x), mx::float32);
    auto indices = kept(logits);
    return {indices, mx::softmax(mx::take_along_axis(logits, indices, -1), -1)};
  }
  if (config.scoring_func == "softmax") {
    // Qwen3-MoE: logits in the network's dtype, softmax in float32.
    auto probs = mx::softmax(mx::astype(gate(x), mx::float32), -1);
    auto indices = kept(probs);
    auto weights = mx::take_along_axis(probs, indices, -1);
    if (config.norm_topk_prob) weights = mx::divide(weights, mx::sum(weights, -1, true));
    return {indices, weights};
  }
  // DeepSeek-V3 / GLM: everything in float32, the gate's weight included (transformers keeps it float32).
  auto logits = mx::matmul(mx::astype(x, mx::float32), mx::transpose(mx::astype(gate.weight, mx::float32)));
  auto scores = mx::sigmoid(logits);
  auto choice = e_score_correction_bias ? mx::add(scores, *e_score_correction_bias) : scores;
  if (config.n_group > 1) {
    // A group's score is the sum of its two best experts'; experts outside the topk_group best groups
    // cannot be chosen.
    const int n = choice.shape(0), g = config.n_group;
    auto grouped = mx::reshape(choice, {n, g, config.num_experts / g});
    auto group_scores = mx::sum(mx::topk(grouped, 2, -1), -1);                          // [N, G]
    auto threshold = mx::min(mx::topk(group_scores, config.topk_group, -1), -1, true);  // [N, 1]
    auto keep = mx::expand_dims(mx::greater_equal(group_scores, threshold), -1);        // [N, G, 1]
    auto masked = mx::where(keep, grouped, mx::array(-std::numeric_limits<float>::infinity()));
    choice = mx::reshape(masked, {n, config.num_experts});
  }
  auto indices = kept(choice);
  auto weights = mx::take_along_axis(scores, indices, -1);
  if (config.norm_topk_prob) weights = mx::divide(weights, mx::add(mx::sum(weights, -1, true), mx::array(1e-20f)));
  return {indices, mx::multiply(weights, mx::array(config.routed_scaling_factor))};
}

MixtureOfExperts MixtureOfExperts::load(const Weights& w, int hidden_size, const MoeConfig& config) {
  const int e = config.num_experts;
  const bool gpt_oss_router = config.scoring_func == "topk_softmax";
  auto gate = w.sub(gpt_oss_router ? "router" : "gate");
  MixtureOfExperts moe{
      .router = Router{.gate = Linear::load(gate, hidden_size, e, gpt_oss_router),
                       .e_score_correction_bias = gate.maybe("e_score_correction_bias", {e}),
                       .config = config},
      .experts = SwitchGLU::load(w, hidden_size, config),
  };
  if (config.scoring_func == "sigmoid") {
    if (!moe.router.e_score_correction_bias) {
      throw std::invalid_argument("missing weight " + gate.full_name("e_score_correction_bias"));
    }
    if (moe.router.gate.quantized) {  // sigmoid routing runs in float32 (transformers keeps the gate so)
      throw std::invalid_argument("weight " + gate.full_name("weight") + ": a sigmoid router's gate must be float");
    }
  }
  if (config.n_shared_experts > 0) {
    moe.shared_experts =
        GatedMLP::load(w.sub("shared_experts"), hidden_size, config.moe_intermediate_size * config.n_shared_experts);
  }
  return moe;
}

mx::array MixtureOfExperts::operator()(const mx::array& x) const {
  const int b = x.shape(0), t = x.shape(1), h = x.shape(2);
  auto tokens = mx::reshape(x, {b * t, h});
  auto [indices, weights] = router(tokens);
  auto routed = experts(tokens, indices);  // [N, k, H]
  auto mixed = mx::sum(mx::multiply(routed, mx::expand_dims(weights, -1)), 1);
  auto out = mx::reshape(mx::astype(mixed, x.dtype()), {b, t, h});
  return shared_experts ? mx::add(out, (*shared_experts)(x)) : out;
}

std::vector<mx::array> MixtureOfExperts::arrays() const {
  auto out = router.gate.arrays();
  if (router.e_score_correction_bias) out.push_back(*router.e_score_correction_bias);
  auto routed = experts.arrays();
  out.insert(out.end(), routed.begin(), routed.end());
  if (shared_experts) {
    auto shared = shared_experts->arrays();
    out.insert(out.end(), shared.begin(), shared.end());
  }
  return out;
}

}  // namespace mlxr
