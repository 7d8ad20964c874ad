#include "text/decoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>

#include "nn/activation.h"
#include "nn/attention.h"
#include "nn/cuda_batch_attention.h"
#include "nn/cuda_decode_attention.h"
#include "nn/cuda_kernel_common.h"
#include "nn/cuda_norm_rope.h"
#include "nn/slicing.h"
#include "nn/weight_list.h"

namespace mlxr {

namespace {

// Whether layer i uses sliding-window attention (DecoderConfig's comment says how it is told).
bool layer_slides(const DecoderConfig& c, int layer) {
  if (!c.layer_types.empty()) {
    return layer < static_cast<int>(c.layer_types.size()) && c.layer_types[layer] == "sliding_attention";
  }
  if (c.sliding_window_pattern > 0) return (layer + 1) % c.sliding_window_pattern != 0;
  return c.sliding_window > 0;
}

void check_windows(const DecoderConfig& c) {
  if (!c.layer_types.empty() && static_cast<int>(c.layer_types.size()) != c.num_hidden_layers) {
    throw std::invalid_argument("config: layer_types names " + std::to_string(c.layer_types.size()) +
                                " layers, the model has " + std::to_string(c.num_hidden_layers));
  }
  for (const auto& type : c.layer_types) {
    if (type != "sliding_attention" && type != "full_attention") {
      throw std::invalid_argument("config: unsupported layer type '" + type +
                                  "' (supported: sliding_attention, full_attention)");
    }
  }
  if (c.sliding_window < 0 || c.sliding_window_pattern < 0) {
    throw std::invalid_argument("config: sliding_window and sliding_window_pattern must not be negative");
  }
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    if (layer_slides(c, i) && c.sliding_window == 0) {
      throw std::invalid_argument("config: layer " + std::to_string(i) +
                                  " uses sliding-window attention but sliding_window is not set");
    }
  }
}

void check_config(const DecoderConfig& c) {
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.num_hidden_layers <= 0 || c.num_attention_heads <= 0 ||
      c.intermediate_size <= 0 || c.head_size() <= 0) {
    throw std::invalid_argument(
        "config: vocab_size, hidden_size, num_hidden_layers, num_attention_heads, "
        "intermediate_size must be positive");
  }
  if (c.num_attention_heads % c.kv_heads() != 0) {
    throw std::invalid_argument("config: num_attention_heads " + std::to_string(c.num_attention_heads) +
                                " is not a multiple of num_key_value_heads " + std::to_string(c.kv_heads()));
  }
  const std::vector<std::string> known{"llama", "qwen3", "mistral", "gemma3", "qwen3_moe", "glm4_moe_lite", "gpt_oss"};
  if (std::find(known.begin(), known.end(), c.architecture) == known.end()) {
    throw std::invalid_argument("unsupported decoder architecture '" + c.architecture + "'");
  }
  if (!c.mlp_layer_types.empty() && static_cast<int>(c.mlp_layer_types.size()) != c.num_hidden_layers) {
    throw std::invalid_argument("config: mlp_layer_types lists " + std::to_string(c.mlp_layer_types.size()) +
                                " layers, num_hidden_layers is " + std::to_string(c.num_hidden_layers));
  }
  for (const auto& type : c.mlp_layer_types) {
    if (type != "dense" && type != "sparse") {
      throw std::invalid_argument("config: mlp_layer_types has '" + type + "' (dense, sparse)");
    }
  }
  if (c.decoder_sparse_step <= 0) throw std::invalid_argument("config: decoder_sparse_step must be positive");
  check_moe_config(c.moe);
  if (c.uses_mla()) check_mla_config(c.mla);
  check_windows(c);
  if (!is_known_activation(c.hidden_act)) {
    throw std::invalid_argument("config: unsupported hidden activation '" + c.hidden_act + "'");
  }
}

// The decoder's RoPE rotates whole heads unless the config says otherwise; MLA rotates only the rope
// part of its heads.
RopeConfig with_dims(RopeConfig rope, const DecoderConfig& c) {
  if (rope.dims == 0) rope.dims = c.head_size();
  if (c.uses_mla()) {
    rope.dims = c.mla.qk_rope_head_dim;
    rope.traditional = c.mla.rope_interleave;
  }
  return rope;
}

std::optional<float> attention_scale_for(const DecoderConfig& c) {
  if (c.query_pre_attn_scalar <= 0.0f) return std::nullopt;
  return static_cast<float>(std::pow(static_cast<double>(c.query_pre_attn_scalar), -0.5));
}

// The routing and the experts' activation are the architecture's: DeepSeek-V3's sigmoid router for GLM,
// GPT-OSS's top-k softmax and clamped SwiGLU (its experts as wide as intermediate_size), softmax and
// SwiGLU otherwise.
MoeConfig moe_for(const DecoderConfig& c) {
  MoeConfig moe = c.moe;
  moe.scoring_func = c.architecture == "glm4_moe_lite" ? "sigmoid" : "softmax";
  if (c.architecture == "gpt_oss") {
    moe.scoring_func = "topk_softmax";
    moe.expert_activation = "swiglu_oai";
    moe.moe_intermediate_size = c.intermediate_size;
  }
  return moe;
}

// The attention's output width (o_proj's input).
int attention_width(const DecoderConfig& c) {
  return c.num_attention_heads * (c.uses_mla() ? c.mla.v_head_dim : c.head_size());
}

DecoderLayer load_layer(const Weights& w, const DecoderConfig& c, int index) {
  const int h = c.hidden_size, d = c.head_size();
  const bool gemma = c.architecture == "gemma3";
  auto norm = [&](const Weights& n, int dims) {
    return gemma ? RMSNorm::load_one_plus(n, dims, c.rms_norm_eps) : RMSNorm::load(n, dims, c.rms_norm_eps);
  };
  const int q_out = c.num_attention_heads * d, kv_out = c.kv_heads() * d;
  auto attn = w.sub("self_attn");
  DecoderLayer layer{
      .o_proj = Linear::load(attn.sub("o_proj"), attention_width(c), h, c.attention_bias),
      .input_norm = norm(w.sub("input_layernorm"), h),
      .post_attention_norm = norm(w.sub("post_attention_layernorm"), h),
      .window = c.window(index),
  };
  if (c.uses_mla()) {
    layer.mla = MultiLatentAttention::load(attn, h, c.num_attention_heads, c.mla, c.attention_bias, c.rope);
  } else {
    layer.qkv_proj = FusedLinear::fuse({Linear::load(attn.sub("q_proj"), h, q_out, c.attention_bias),
                                        Linear::load(attn.sub("k_proj"), h, kv_out, c.attention_bias),
                                        Linear::load(attn.sub("v_proj"), h, kv_out, c.attention_bias)});
  }
  if (c.is_sparse_layer(index)) {
    layer.moe = MixtureOfExperts::load(w.sub("mlp"), h, moe_for(c));
  } else {
    layer.mlp = GatedMLP::load(w.sub("mlp"), h, c.intermediate_size, c.mlp_bias, c.hidden_act);
  }
  if (c.architecture == "gpt_oss") layer.sinks = attn.get("sinks", {c.num_attention_heads});
  if (c.architecture == "qwen3" || c.architecture == "qwen3_moe" || gemma) {
    layer.q_norm = norm(attn.sub("q_norm"), d);
    layer.k_norm = norm(attn.sub("k_norm"), d);
  }
  if (gemma) {
    layer.pre_feedforward_norm = norm(w.sub("pre_feedforward_layernorm"), h);
    layer.post_feedforward_norm = norm(w.sub("post_feedforward_layernorm"), h);
  }
  return layer;
}

}  // namespace

DecoderConfig DecoderConfig::defaults(const std::string& architecture) {
  DecoderConfig c;
  c.architecture = architecture;
  if (architecture == "mistral") {  // MistralConfig / MinistralConfig
    c.intermediate_size = 14336;
    c.num_key_value_heads = 8;
    c.sliding_window = 4096;
  } else if (architecture == "gemma3") {  // Gemma3TextConfig
    c.vocab_size = 262208;
    c.hidden_size = 2304;
    c.intermediate_size = 9216;
    c.num_hidden_layers = 26;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 4;
    c.head_dim = 256;
    c.hidden_act = "gelu_pytorch_tanh";
    c.tie_word_embeddings = true;
    c.query_pre_attn_scalar = 256.0f;
    c.sliding_window = 4096;
    c.sliding_window_pattern = 6;
    c.rope.rope_theta = 1000000.0f;
    c.sliding_rope.rope_theta = 10000.0f;
  } else if (architecture == "qwen3_moe") {  // Qwen3MoeConfig
    c.vocab_size = 151936;
    c.hidden_size = 2048;
    c.intermediate_size = 6144;
    c.num_hidden_layers = 24;
    c.num_key_value_heads = 4;
    c.moe.num_experts = 128;
  } else if (architecture == "glm4_moe_lite") {  // Glm4MoeLiteConfig (its mlp_layer_types: the first dense)
    c.vocab_size = 154880;
    c.hidden_size = 2048;
    c.intermediate_size = 10240;
    c.num_hidden_layers = 47;
    c.num_attention_heads = 20;
    c.num_key_value_heads = 20;
    c.rms_norm_eps = 1e-5f;
    c.first_k_dense_replace = 1;
    c.moe.num_experts = 64;
    c.moe.num_experts_per_tok = 4;
    c.moe.moe_intermediate_size = 1536;
    c.moe.norm_topk_prob = true;
    c.moe.routed_scaling_factor = 1.8f;
    c.moe.n_shared_experts = 1;
  } else if (architecture == "gpt_oss") {  // GptOssConfig (its layer_types: sliding, full, sliding, ...)
    c.vocab_size = 201088;
    c.hidden_size = 2880;
    c.intermediate_size = 2880;
    c.num_hidden_layers = 36;
    c.num_attention_heads = 64;
    c.num_key_value_heads = 8;
    c.head_dim = 64;
    c.rms_norm_eps = 1e-5f;
    c.attention_bias = true;
    c.sliding_window = 128;
    c.sliding_window_pattern = 2;
    c.moe.num_experts = 128;
    c.moe.num_experts_per_tok = 4;
    c.rope.rope_theta = 150000.0f;
    c.rope.rope_type = "yarn";
    c.rope.factor = 32.0f;
    c.rope.original_max_position_embeddings = 4096;
    c.rope.truncate = false;
    c.sliding_rope = c.rope;
  }
  return c;
}

bool DecoderConfig::is_sparse_layer(int layer) const {
  if (moe.num_experts <= 0) return false;
  if (!mlp_layer_types.empty()) return mlp_layer_types[layer] == "sparse";
  const bool dense_only = std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end();
  return layer >= first_k_dense_replace && !dense_only && (layer + 1) % decoder_sparse_step == 0;
}

int DecoderConfig::window(int layer) const {
  return layer_slides(*this, layer) ? sliding_window : 0;
}

Decoder::Decoder(const DecoderConfig& config, const WeightMap& weights, const QuantMap& quantization)
    : config_((check_config(config), config)),
      embed_tokens_{mx::array(0)},
      norm_{mx::array(0), 0},
      rope_(with_dims(config_.rope, config_)),
      sliding_rope_(with_dims(config_.sliding_rope, config_)),
      attention_scale_(attention_scale_for(config_)),
      packed_(!quantization.empty()) {
  Weights root(weights, quantization);
  auto model = root.sub("model");
  embed_tokens_ = Embedding::load(model.sub("embed_tokens"), config_.vocab_size, config_.hidden_size);
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    layers_.push_back(load_layer(model.sub("layers." + std::to_string(i)), config_, i));
  }
  norm_ = config_.architecture == "gemma3"
              ? RMSNorm::load_one_plus(model.sub("norm"), config_.hidden_size, config_.rms_norm_eps)
              : RMSNorm::load(model.sub("norm"), config_.hidden_size, config_.rms_norm_eps);
  // Some tied checkpoints still carry lm_head.weight; honour the config, as transformers does.
  if (!config_.tie_word_embeddings) {
    lm_head_ = Linear::load(root.sub("lm_head"), config_.hidden_size, config_.vocab_size, false);
  }
}

namespace {

// Heads [first, first + n) of x [B, T, heads, D], as [B, n, T, D].
mx::array head_range(const mx::array& x, int first, int n) {
  return heads_first(axis_slice(x, 2, first, first + n));
}

// The fused kernel's positions: one offset for every row, or one per row.
mx::array offsets_array(int offset) {
  return mx::array({offset});
}
const mx::array& offsets_array(const mx::array& offsets) {
  return offsets;
}

}  // namespace

const mx::array& Decoder::LayerInput::normed() {
  if (!normed_) made_here();
  return *normed_;
}

const mx::array& Decoder::LayerInput::sum() {
  if (!sum_) made_here();
  return *sum_;
}

void Decoder::LayerInput::made_here() {
  auto [sum, normed] = in_.sum_and_norm(norm_);
  sum_ = sum;
  normed_ = normed;
}

mx::array Decoder::LayerInput::project(const FusedLinear& projection) {
  if (!normed_) {
    if (auto fused = projection.normed_product(norm_input())) {
      sum_ = fused->first;
      return fused->second;
    }
  }
  return projection(normed());
}

std::optional<QkvHeads> Decoder::LayerInput::project_heads(const FusedLinear& projection, const HeadSplit& split) {
  if (normed_) return std::nullopt;
  auto fused = projection.normed_heads(norm_input(), split);
  if (fused) sum_ = fused->sum;
  return fused;
}

mx::array Decoder::LayerInput::activate(const GatedMLP& mlp) {
  if (!normed_) {
    if (auto fused = mlp.normed_activated(norm_input())) {
      sum_ = fused->first;
      return fused->second;
    }
  }
  return mlp.activated(normed());
}

template <typename Offset>
std::tuple<mx::array, mx::array, mx::array> Decoder::project_qkv(const DecoderLayer& layer, LayerInput& input,
                                                                 const Rope& rope, const Offset& offset,
                                                                 const std::optional<mx::array>& device_offset,
                                                                 std::optional<DecodeRope>* rope_in_attention) const {
  const int hq = config_.num_attention_heads, hkv = config_.kv_heads();
  std::optional<HeadSplit> split;  // for the CUDA kernels that make the heads
  if (rope.fused() && running_on_cuda()) {
    std::optional<QkNorms> norms;
    if (layer.q_norm) norms = QkNorms{layer.q_norm->weight, layer.k_norm->weight, layer.q_norm->eps};
    split = HeadSplit{hq, hkv, norms, *rope.fused(), device_offset ? *device_offset : offsets_array(offset)};
    if (auto heads = input.project_heads(layer.qkv_proj, *split)) return {heads->q, heads->k, heads->v};
  }
  auto projected = input.project(layer.qkv_proj);
  const int b = projected.shape(0), t = projected.shape(1), d = config_.head_size();
  // [B, T, (hq + 2 hkv) D] -> heads [B, T, hq + 2 hkv, D]; q, k, v are views of their head ranges. CUDA's q|k|v
  // kernel reads the product as it is and writes all three heads first: no reshape or views to encode.
  const auto split_heads = [&] { return mx::reshape(projected, {b, t, hq + 2 * hkv, d}); };
  if (split && rope_in_attention) {
    DecodeRope in_kernel{split->rope, split->norms};
    if (t > 1) {
      // A short chunk the chunk kernel takes from the product itself (unless MLXRUNNER_CHUNK_ROPE=0): it reads each
      // head in place and makes the norms and RoPE (one operation fewer, and no views to build). q, k and v are the
      // product.
      if (chunk_attention_switched_on() && cuda_chunk_attention_ropes(projected, hq, hkv, in_kernel)) {
        *rope_in_attention = std::move(in_kernel);
        return {projected, projected, projected};
      }
    } else {
      // A decode step the attention kernel takes: it makes the norms and RoPE itself (one launch fewer).
      auto qkv = split_heads();
      auto q = head_range(qkv, 0, hq), k = head_range(qkv, hq, hkv), v = head_range(qkv, hq + hkv, hkv);
      if (cuda_decode_attention_applies(q, k, v) && cuda_decode_attention_ropes(q, in_kernel)) {
        *rope_in_attention = std::move(in_kernel);
        return {q, k, v};
      }
    }
  }
  if (split) {
    if (auto heads = cuda_qkv_heads(projected, hq, hkv, split->norms, split->rope, split->offsets)) {
      return {heads->q, heads->k, heads->v};
    }
  }
  auto qkv = split_heads();
  auto v = head_range(qkv, hq + hkv, hkv);
  auto q = head_range(qkv, 0, hq);
  auto k = head_range(qkv, hq, hkv);
  if (layer.q_norm) {
    q = (*layer.q_norm)(q);
    k = (*layer.k_norm)(k);
  }
  return {rope(q, offset), rope(k, offset), v};
}

// One sequence's attention on CUDA by the kernels that write the new keys and values into a full cache's buffers
// themselves (nn/cuda_decode_attention.h): a decode step where the buffers are this cache's alone, and (unless
// MLXRUNNER_CHUNK_ATTENTION=0) a short chunk (the rest of a prompt after the prompt cache, a chat's next turn), whose
// keys MLX writes first where a copy shares the buffers. [1, T, q_heads D], or nullopt where neither applies.
std::optional<mx::array> Decoder::attention_in_cache(const mx::array& q, const mx::array& k, const mx::array& v,
                                                     KVCache& cache, int offset,
                                                     const std::optional<mx::array>& device_offset,
                                                     const std::optional<DecodeRope>& rope) const {
  const auto position = [&] { return device_offset ? *device_offset : offsets_array(offset); };
  if (rope && q.ndim() == 3) {  // a chunk's q|k|v product (project_qkv): the chunk kernel reads its heads in place
    const int hq = config_.num_attention_heads, hkv = config_.kv_heads(), d = config_.head_size(), tokens = q.shape(1);
    const float scale = scale_or_default(attention_scale_, d);
    auto [keys, values] = cache.reserve(tokens, hkv, d, q.dtype());
    return cuda_chunk_attention_from_product(q, hq, hkv, keys, values, position(), offset + tokens, scale, *rope);
  }
  const float scale = scale_or_default(attention_scale_, q);
  const int tokens = q.shape(2);
  if (cache.writes_in_place() && cuda_decode_attention_applies(q, k, v)) {
    auto [keys, values] = cache.reserve(1, k);
    return cuda_decode_attention(q, k, v, keys, values, position(), offset + 1, scale, rope);
  }
  if (rope) throw std::logic_error("attention_in_cache: q and k without their RoPE, and no decode kernel to make it");
  if (chunk_attention_switched_on() && cuda_chunk_attention_applies(q, k, v)) {
    auto [keys, values] = cache.writes_in_place() ? cache.reserve(tokens, k) : cache.append_buffers(k, v);
    return cuda_chunk_attention(q, k, v, keys, values, position(), offset + tokens, scale);
  }
  return std::nullopt;
}

mx::array Decoder::attention(const DecoderLayer& layer, LayerInput& input, KVCache* cache, int offset,
                             const std::optional<mx::array>& mask,
                             const std::optional<mx::array>& device_offset) const {
  if (layer.mla) return layer.o_proj((*layer.mla)(input.normed(), cache, offset, rope_, mask));
  const bool in_cache = cache && !mask && !layer.sinks && cache->window() == 0;
  // Where the decode kernel will write this cache in place, it may make the q/k norms and RoPE too.
  std::optional<DecodeRope> rope_in_attention;
  auto [q, k, v] = project_qkv(layer, input, layer.window > 0 ? sliding_rope_ : rope_, offset, device_offset,
                               in_cache && cache->writes_in_place() ? &rope_in_attention : nullptr);
  if (in_cache) {
    if (auto attended = attention_in_cache(q, k, v, *cache, offset, device_offset, rope_in_attention)) {
      return layer.o_proj(*attended);
    }
  }
  if (cache) {
    std::tie(k, v) = cache->update_and_fetch(k, v);
  }
  mx::array out = mask               ? mlxr::attention(q, k, v, mask, attention_scale_, layer.sinks)
                  : layer.window > 0 ? windowed_causal_attention(q, k, v, layer.window, attention_scale_, layer.sinks)
                                     : causal_attention(q, k, v, attention_scale_, layer.sinks);
  return layer.o_proj(merge_heads(out));
}

mx::array Decoder::right_padded_attention(const DecoderLayer& layer, LayerInput& input, int real) const {
  auto [q, k, v] = project_qkv(layer, input, rope_, 0);
  const int length = q.shape(2);
  auto keys = axis_slice(k, 2, 0, real), values = axis_slice(v, 2, 0, real);
  std::vector<mx::array> parts{
      causal_attention(axis_slice(q, 2, 0, real), keys, values, attention_scale_, layer.sinks)};
  if (real < length) {
    parts.push_back(
        mlxr::attention(axis_slice(q, 2, real, length), keys, values, std::nullopt, attention_scale_, layer.sinks));
  }
  return layer.o_proj(merge_heads(mx::concatenate(parts, 2)));
}

mx::array Decoder::batch_attention(const DecoderLayer& layer, LayerInput& input, BatchKVCache& cache,
                                   const mx::array& positions, int visible, const std::optional<mx::array>& mask,
                                   const std::optional<WindowStep>& window) const {
  // A sliding-window layer writes each row at its rotation's slot and sees the slots it holds (forward_batch).
  const bool slides = layer.window > 0;
  if (slides && !window) throw std::logic_error("a batch step of a sliding-window model without its WindowStep");
  auto [q, k, v] = project_qkv(layer, input, slides ? sliding_rope_ : rope_, positions);
  const auto& seen = slides ? window->mask : mask;
  std::tie(k, v) = cache.update_and_fetch(k, v, slides ? window->slots : positions, slides ? window->visible : visible);
  // Rows holding different numbers of slots: MLX's fused attention takes no mask.
  if (seen && batch_attention_switched_on()) {
    if (auto out = cuda_batch_decode_attention(q, cache.keys(), cache.values(), slides ? window->last_slots : positions,
                                               scale_or_default(attention_scale_, q))) {
      return layer.o_proj(*out);
    }
  }
  return layer.o_proj(merge_heads(mlxr::attention(q, k, v, seen, attention_scale_, layer.sinks)));
}

mx::array Decoder::mlp(const DecoderLayer& layer, LayerInput& input) const {
  if (layer.moe) return (*layer.moe)(input.normed());
  return layer.mlp->down_proj(input.activate(*layer.mlp));
}

mx::array Decoder::embed(const mx::array& tokens) const {
  auto x = embed_tokens_(tokens);
  if (config_.architecture != "gemma3") return x;
  // Gemma scales the embeddings by sqrt(hidden_size), rounded to their dtype as transformers does.
  return mx::multiply(x, mx::array(static_cast<float>(std::sqrt(static_cast<double>(config_.hidden_size))), x.dtype()));
}

Decoder::Residual Decoder::layer_forward(const DecoderLayer& layer, const Residual& in, const Attend& attend) const {
  LayerInput input(in, layer.input_norm);
  auto attended = attend(input);
  if (layer.pre_feedforward_norm) {  // Gemma: a norm before and after each block
    LayerInput ff(Residual{input.sum(), layer.post_attention_norm(attended)}, *layer.pre_feedforward_norm);
    auto out = (*layer.post_feedforward_norm)(mlp(layer, ff));
    return {ff.sum(), out};
  }
  LayerInput ff(Residual{input.sum(), attended}, layer.post_attention_norm);
  auto out = mlp(layer, ff);  // first: its kernel may make the sum too
  return {ff.sum(), out};
}

std::vector<KVCache> Decoder::make_cache() const {
  std::vector<KVCache> cache;
  for (const auto& layer : layers_) cache.emplace_back(layer.window);
  return cache;
}

// Attention sinks (GPT-OSS) do not batch yet: on an H100 (session 34) a process that had run the batch tests gave a
// freshly loaded GPT-OSS fixture another lone greedy text for a 300-token prompt than a fresh process and the CPU did;
// not found in the device time left, and batching them would put that path under every concurrent request.
bool Decoder::can_batch() const {
  return std::none_of(layers_.begin(), layers_.end(),
                      [](const DecoderLayer& l) { return l.mla.has_value() || l.sinks.has_value(); });
}

void Decoder::eval_weights() const {
  // Layer by layer: each layer's separate checkpoint arrays can go once its fused projections are built.
  for (const auto& layer : layers_) {
    WeightList weights;
    weights.add(layer.input_norm).add(layer.post_attention_norm).add(layer.qkv_proj).add(layer.o_proj);
    if (layer.mla) weights.add_all(layer.mla->arrays());
    weights.add_all(layer.moe ? layer.moe->arrays() : layer.mlp->arrays());
    weights.add(layer.q_norm).add(layer.k_norm).add(layer.pre_feedforward_norm).add(layer.post_feedforward_norm);
    weights.add(layer.sinks);
    mx::eval(weights.arrays);
  }
  WeightList rest;
  rest.add_all(embed_tokens_.arrays()).add(norm_).add(lm_head_);
  mx::eval(rest.arrays);
}

namespace {

// Two measuring switches (benchmarks/gpu/follow_up_slack.py): a known extra time for each layer of a waited-for forward
// on the GPU, on the host, to see which of them sets the pace of a prompt cache's follow-up (its time grows by the
// extra time of the side that does, by less where that side waits for the other). Both off unless set.
// - MLXRUNNER_PROBE_HOST_DELAY_US=D: the host spins D µs before queuing each layer.
// - MLXRUNNER_PROBE_GPU_SPIN_NS=S (S >= 0): after each layer a kernel copies the hidden state, one thread of each block
//   holding it S ns longer by the GPU's clock; S = 0 is the control (the same operation for the host, no wait).
void probe_host_delay() {
  static EnvSwitch host_delay("MLXRUNNER_PROBE_HOST_DELAY_US", 0);
  const long long delay_us = host_delay.number();
  if (delay_us <= 0) return;
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(delay_us);
  while (std::chrono::steady_clock::now() < until) {
  }
}

mx::array probe_gpu_spin(const mx::array& x) {
  static EnvSwitch gpu_spin("MLXRUNNER_PROBE_GPU_SPIN_NS", -1);
  const long long spin_ns = gpu_spin.number();
  if (spin_ns < 0 || !running_on_cuda()) return x;
  static const auto kernel = cuda_kernel("mlxr_probe_gpu_spin", {"x"}, {"out"}, R"(
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  size_t n = 1;
  for (int d = 0; d < x_ndim; ++d) n *= x_shape[d];
  if (i < n) out[i] = x[i];
  if (threadIdx.x == 0) {
    do {
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < SPIN_NS);
  }
)",
                                         "", true);
  const int threads = static_cast<int>((x.size() + 255) / 256 * 256);
  return kernel({x}, {x.shape()}, {x.dtype()}, {threads, 1, 1}, {256, 1, 1},
                {{"SPIN_NS", static_cast<int>(std::min(spin_ns, 1000000000LL))}}, std::nullopt, false, {})[0];
}

// How a forward's layers reach the device while the host builds the rest of it.
// - Paced: a packed model's many-row products multiply dequantized copies of its weights (nn/linear.cpp). In one
//   lazy graph, every layer's copy can be alive at once where the host queues work far ahead of the device: on an
//   H200 a 4-bit Llama-3-8B's 1,024-token prefill peaked 14.5 GB above its 4.5 GB of weights, near the bf16 model's
//   size (mlx-lm's: 3.7 GB). A paced forward queues each layer's output and then waits for the one before, so at most
//   two layers' copies are in flight; the device still has the next layer queued while the host waits.
// - Early: a forward the caller waits for (a request's prefill, a text encoder's prompt) on a GPU queues its first
//   layer, then every kEarlyDispatchLayers layers, as they are built, so that the device starts on the first layers
//   while the host builds the rest; built whole and then evaluated, the device waited for the whole graph to be built
//   first. A decode step needs none of this: the generator builds step n + 1 while the device runs step n. Measured on
//   an H100 (session 23, the prompt cache's 64-token follow-up on a Qwen3-4B shape; the pieces then counted from the
//   forward's start): 9.99 ms queued at the end, 9.35 every 8 layers, 8.19 every 4, 7.74 every 2, 7.38 every layer.
//   Not on the CPU: there (this 2-core VM, tiny Qwen3) it slowed a 3,000-token prefill from ~70 to ~113 ms, the
//   layers' kernels and the host's building sharing the cores. A worker thread that encoded each queued layer while
//   this thread built the next was timed on an H100 in sessions 31 and 32 and removed: the forward returned ~2 ms
//   sooner, the request did not (benchmarks/README.md).
// - At the end: nothing queued before the caller evaluates the forward's output (decode steps, the CPU).
class LayerPacer {
 public:
  enum class Mode { kAtEnd, kEarly, kPaced };
  explicit LayerPacer(Mode mode) : mode_(mode) {}
  bool early() const { return mode_ == Mode::kEarly; }
  void queued(std::vector<mx::array> outputs) {
    ++layers_;
    if (early()) {
      probe_host_delay();
      // The first layer alone, so that the device starts as soon as it can; then every N.
      if ((layers_ - 1) % early_dispatch_layers() == 0) mx::async_eval(outputs);
    }
    if (mode_ != Mode::kPaced) return;
    mx::async_eval(outputs);
    if (previous_) mx::eval(*previous_);
    previous_ = std::move(outputs);
  }

  // Layers a queued piece holds after the first layer's: MLXRUNNER_EARLY_DISPATCH=N sets it, 0 turns early dispatch
  // off (to measure it). Each piece is a commit of MLX's (its CUDA graph's update and launch, a completion handler):
  // ~17 % of the follow-up's host time at N = 1 in session 38's profile (benchmarks/gpu/host_profile.py). Fewer
  // commits were slower all the same (session 39, H100, paired in one process: N = 2 +1.1 ms, N = 3 +2.5), and so was
  // queuing each layer's attention output as a piece of its own (+0.36 ms; the switch that did it is gone).
  static int early_dispatch_layers() {
    static EnvSwitch early_dispatch("MLXRUNNER_EARLY_DISPATCH", kEarlyDispatchLayers);
    return static_cast<int>(std::max(0LL, early_dispatch.number()));
  }

 private:
  static constexpr int kEarlyDispatchLayers = 1;
  Mode mode_;
  int layers_ = 0;
  std::optional<std::vector<mx::array>> previous_;
};

LayerPacer::Mode pacing(bool paced, bool waited_for) {
  if (paced) return LayerPacer::Mode::kPaced;
  const bool early = waited_for && mx::default_device() == mx::Device::gpu && LayerPacer::early_dispatch_layers() > 0;
  return early ? LayerPacer::Mode::kEarly : LayerPacer::Mode::kAtEnd;
}

}  // namespace

bool Decoder::paced(const mx::array& embedded) const {
  return packed_ && multiplies_dequantized(embedded);
}

std::optional<mx::array> Decoder::device_offset(int offset) const {
  static EnvSwitch device_offsets("MLXRUNNER_DEVICE_OFFSET");
  if (device_offsets.off() || !running_on_cuda() || !(rope_.fused() || sliding_rope_.fused())) return std::nullopt;
  return mx::arange(offset, offset + 1, mx::int32);  // no input: its kernel writes device memory
}

mx::array Decoder::forward(const mx::array& tokens, std::vector<KVCache>& cache, bool last_only) const {
  if (cache.size() != layers_.size()) {
    throw std::invalid_argument("cache has " + std::to_string(cache.size()) + " layers, the model " +
                                std::to_string(layers_.size()));
  }
  const int offset = cache[0].offset();
  const auto positions = device_offset(offset);
  Residual x{embed(tokens)};
  // A prefill's forward (many rows, or the last token that gives a request's first logits) is waited for.
  LayerPacer pacer(pacing(paced(x.base), last_only || tokens.shape(1) > 1));
  for (size_t i = 0; i < layers_.size(); ++i) {
    x = layer_forward(layers_[i], x, [&](LayerInput& h) {
      return attention(layers_[i], h, &cache[i], offset, std::nullopt, positions);
    });
    if (pacer.early()) x.base = probe_gpu_spin(x.base);
    pacer.queued(x.arrays());
  }
  if (last_only) {
    const int t = tokens.shape(1);
    auto last = [t](const mx::array& a) { return axis_slice(a, 1, t - 1, t); };
    x = Residual{last(x.base), x.delta ? std::optional{last(*x.delta)} : std::nullopt};
  }
  return logits(x);
}

mx::array Decoder::forward_batch(const mx::array& tokens, const mx::array& positions, int visible,
                                 const std::optional<mx::array>& mask, std::vector<BatchKVCache>& cache,
                                 const std::optional<WindowStep>& window) const {
  if (!can_batch()) throw std::logic_error("this model has latent attention or attention-sink layers: it cannot batch");
  if (cache.size() != layers_.size()) {
    throw std::invalid_argument("batch cache has " + std::to_string(cache.size()) + " layers, the model " +
                                std::to_string(layers_.size()));
  }
  Residual x{embed(tokens)};
  for (size_t i = 0; i < layers_.size(); ++i) {
    x = layer_forward(layers_[i], x, [&](LayerInput& h) {
      return batch_attention(layers_[i], h, cache[i], positions, visible, mask, window);
    });
  }
  return logits(x);
}

mx::array Decoder::logits(const Residual& hidden) const {
  auto x = hidden.sum_and_norm(norm_).second;
  auto out = lm_head_ ? (*lm_head_)(x) : embed_tokens_.as_linear(x);
  if (config_.final_logit_softcapping > 0.0f) {
    auto cap = mx::array(config_.final_logit_softcapping, out.dtype());
    out = mx::multiply(mx::tanh(mx::divide(out, cap)), cap);
  }
  return out;
}

namespace {

// How many tokens a one-row attention mask keeps when they all come before its padding (right padding, at least
// one token); none otherwise.
std::optional<int> right_padded_length(const mx::array& attention_mask) {
  if (attention_mask.ndim() != 2 || attention_mask.shape(0) != 1) return std::nullopt;
  auto kept = mx::astype(mx::not_equal(attention_mask, mx::array(0, attention_mask.dtype())), mx::int32);
  auto count = mx::sum(kept);
  // Right padding: the kept positions are exactly the first `count`.
  auto leading = mx::sum(mx::cumprod(kept, 1));
  mx::eval(count, leading);
  const int real = count.item<int>();
  if (real == 0 || leading.item<int>() != real) return std::nullopt;
  return real;
}

}  // namespace

std::vector<mx::array> Decoder::hidden_states(const mx::array& tokens, const std::optional<mx::array>& attention_mask,
                                              const std::vector<int>& layers, bool final_norm) const {
  std::optional<mx::array> mask;
  if (attention_mask) mask = causal_padding_key_mask(*attention_mask);
  // On the CPU a right-padded prompt's attention is computed in its two unmasked parts (right_padded_attention).
  // Not on a GPU: its fused kernels take the whole masked square in one shape, where the parts' shapes would change
  // with every prompt's length (and CUDA builds a cuDNN graph for each new shape).
  std::optional<int> real;
  if (attention_mask && mx::default_device() == mx::Device::cpu) real = right_padded_length(*attention_mask);
  // Sliding-window layers see the window within the causal (and padding) mask.
  const int t = tokens.shape(1);
  auto window_mask = [&](int window) -> std::optional<mx::array> {
    if (window == 0) return mask;
    auto sliding = sliding_window_mask(t, t, window);
    return mask ? mx::logical_and(*mask, sliding) : sliding;
  };
  const int last = *std::max_element(layers.begin(), layers.end());
  if (last > static_cast<int>(layers_.size()) || *std::min_element(layers.begin(), layers.end()) < 0) {
    throw std::invalid_argument("hidden state index out of range 0.." + std::to_string(layers_.size()));
  }
  const auto positions = device_offset(0);
  std::vector<mx::array> all{embed(tokens)};
  LayerPacer pacer(pacing(paced(all.back()), /*waited_for=*/true));
  for (int i = 0; i < last; ++i) {
    auto mask_i = window_mask(layers_[i].window);
    const bool split = real && layers_[i].window == 0 && !layers_[i].mla;
    all.push_back(layer_forward(layers_[i], Residual{all.back()}, [&](LayerInput& h) {
                    return split ? right_padded_attention(layers_[i], h, *real)
                                 : attention(layers_[i], h, nullptr, 0, mask_i, positions);
                  }).sum());
    pacer.queued({all.back()});
  }
  std::vector<mx::array> picked;
  const int final_index = static_cast<int>(layers_.size());
  for (int i : layers) {
    // transformers' last hidden state is the final norm's output, the others are raw layer outputs.
    picked.push_back(i == final_index && final_norm ? norm_(all[i]) : all[i]);
  }
  return picked;
}

}  // namespace mlxr
