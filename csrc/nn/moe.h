// Mixture-of-experts feed-forward blocks (Qwen3-MoE, DeepSeek-V3 / GLM-4.7-Flash, GPT-OSS), and the dense
// gated MLP they are made of.
//
// A router scores every expert per token and keeps the top k; each token then runs through its k
// experts' SwiGLU MLPs and the outputs are summed, weighted by the router's scores. The experts' weights
// are stacked [E, out, in] and multiplied with MLX's gather_mm / gather_qmm, which pick each token's
// expert matrices by index: one kernel per projection for all experts. With many tokens (prefill) the
// tokens are first sorted by expert, so each expert's rows are read once (mlx-lm's SwitchGLU does the same).
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "nn/config_fields.h"
#include "nn/linear.h"

namespace mlxr {

// The routed experts of a MoE layer, as config.json names them. Defaults: transformers' Qwen3MoeConfig
// (GLM / DeepSeek-V3 configs name every routing field they use), the SwiGLU clamp GptOssConfig's.
struct MoeConfig {
  int num_experts = 0;  // 0: no MoE layers (a dense model)
  int num_experts_per_tok = 8;
  int moe_intermediate_size = 768;
  bool norm_topk_prob = false;  // rescale the k kept scores to sum to 1
  int n_group = 1;
  int topk_group = 1;
  float routed_scaling_factor = 1.0f;
  int n_shared_experts = 0;  // experts every token runs through: one MLP of n * moe_intermediate_size
  // Not a config.json key but the architecture's (the decoder sets it). softmax: top k of softmax(logits)
  // (Qwen3-MoE). sigmoid: DeepSeek-V3's routing, top k of sigmoid(logits) + e_score_correction_bias,
  // searched only in the topk_group best of n_group expert groups (a group scores the sum of its two best),
  // weighted by the sigmoid scores (without the bias) times routed_scaling_factor. topk_softmax (GPT-OSS):
  // the k largest logits of a biased router, softmaxed among themselves.
  std::string scoring_func = "softmax";
  // Not a config.json key either: the experts' activation. silu: SwiGLU, silu(gate) * up. swiglu_oai
  // (GPT-OSS): gate clamped above and up on both sides at swiglu_limit, then
  // (up + 1) * gate * sigmoid(swiglu_alpha * gate).
  std::string expert_activation = "silu";
  float swiglu_alpha = 1.702f;
  float swiglu_limit = 7.0f;

  MLXR_CONFIG_FIELDS(MoeConfig, num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob, n_group,
                     topk_group, routed_scaling_factor, n_shared_experts, swiglu_alpha, swiglu_limit)
};

// Throws std::invalid_argument naming the field when the routing cannot run.
void check_moe_config(const MoeConfig& config);

// down(act(gate(x)) * up(x)), act SiLU unless the config names another (Gemma's GELU-tanh); gate and up
// stored as one [gate | up] layer (one matmul fewer).
struct GatedMLP {
  FusedLinear gate_up_proj;
  Linear down_proj;
  int intermediate_size;
  std::string activation = "silu";  // a hidden_act name (nn/activation.h)

  static GatedMLP load(const Weights& w, int hidden_size, int intermediate_size, bool with_bias = false,
                       const std::string& activation = "silu");
  mx::array operator()(const mx::array& x) const;
  // activation(gate) * up, the input of down_proj.
  mx::array activated(const mx::array& x) const;
  // (x + delta, activated() of its RMSNorm) in one kernel where nn/cuda_matvec takes it (SiLU, a packed decode step
  // on CUDA); nullopt otherwise.
  std::optional<std::pair<mx::array, mx::array>> normed_activated(const NormInput& input) const;
  std::vector<mx::array> arrays() const;

 private:
  // The one bias-free gate|up layer of a SiLU MLP, which the gated kernels may take; nullptr otherwise.
  const Linear* silu_gate_up_alone() const;
};

// E linear layers stacked [E, out, in] (packed: [E, out, in * bits / 32]); each row of x multiplied by
// the experts its indices name, plus their bias [E, out] if any (GPT-OSS).
struct SwitchLinear {
  mx::array weight;
  std::optional<Quantized> quantized;
  std::optional<mx::array> bias;

  // x [..., 1, in] and indices [...] -> [..., 1, out]. `sorted`: indices ascending (see SwitchGLU).
  mx::array operator()(const mx::array& x, const mx::array& indices, bool sorted) const;
  std::vector<mx::array> arrays() const;

 private:
  mx::array product(const mx::array& x, const mx::array& indices, bool sorted) const;  // before the bias
};

// The routed experts' gated MLPs: down(act(gate(x), up(x))), act MoeConfig's expert_activation.
struct SwitchGLU {
  SwitchLinear gate_proj, up_proj, down_proj;
  MoeConfig config;  // the activation and its constants

  // Reads the spellings checkpoints use, under `w` (a layer's `mlp`):
  //   switch_mlp.{gate,up,down}_proj.weight [E, out, in]   mlx-lm (float or packed)
  //   experts.{gate,up,down}_proj.{weight,bias}            mlx-lm's GPT-OSS, the same stacked with biases
  //   experts.{i}.{gate,up,down}_proj.weight [out, in]     transformers' save_pretrained, Ollama's packed blobs
  //   experts.gate_up_proj [E, 2 I, H], experts.down_proj [E, H, I]  transformers 5's fused experts
  //   experts.gate_up_proj [E, H, 2 I] (+ _bias [E, 2 I]), experts.down_proj [E, I, H] (+ _bias [E, H])
  //     transformers' GPT-OSS: the inputs first, gate and up interleaved (even outputs gate, odd up)
  //   experts.{gate_up,down}_proj_{blocks,scales} (+ the biases)  GPT-OSS's MXFP4 checkpoints: the same
  //     experts as [E, out, in] MXFP4 (nn/weights.h), kept packed
  // The experts' width is config.moe_intermediate_size (for GPT-OSS the decoder copies intermediate_size there).
  static SwitchGLU load(const Weights& w, int hidden_size, const MoeConfig& config);
  // x [N, H], indices [N, k] -> [N, k, H]: each token through each of its k experts.
  mx::array operator()(const mx::array& x, const mx::array& indices) const;
  std::vector<mx::array> arrays() const;

 private:
  mx::array activate(const mx::array& gate, const mx::array& up) const;
};

// Which experts each token goes to, and with what weight.
struct Router {
  Linear gate;                                       // [E, H] (+ bias [E], GPT-OSS): one logit per expert
  std::optional<mx::array> e_score_correction_bias;  // [E], sigmoid routing
  MoeConfig config;

  // x [N, H] -> (expert indices [N, k] uint32, weights [N, k] float32).
  std::pair<mx::array, mx::array> operator()(const mx::array& x) const;
};

// A MoE feed-forward layer: routed experts, plus shared experts every token runs through (GLM).
struct MixtureOfExperts {
  Router router;
  SwitchGLU experts;
  std::optional<GatedMLP> shared_experts;

  // `w`: the layer's `mlp` (router `gate`, or GPT-OSS's biased `router`; experts, `shared_experts`).
  static MixtureOfExperts load(const Weights& w, int hidden_size, const MoeConfig& config);
  mx::array operator()(const mx::array& x) const;  // [B, T, H] -> [B, T, H]
  std::vector<mx::array> arrays() const;
};

}  // namespace mlxr
