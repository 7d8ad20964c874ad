#include "text/decoder.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "nn/attention.h"

namespace mlxr {

namespace {

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
  const std::vector<std::string> known{"llama", "qwen3", "qwen3_moe", "glm4_moe_lite"};
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
}

// The decoder's RoPE rotates whole heads unless the config says otherwise; MLA rotates only the rope
// part of its heads.
RopeConfig rope_for(const DecoderConfig& c) {
  RopeConfig rope = c.rope;
  if (c.uses_mla()) {
    rope.dims = c.mla.qk_rope_head_dim;
    rope.traditional = c.mla.rope_interleave;
  }
  if (rope.dims == 0) rope.dims = c.head_size();
  return rope;
}

// The routing is the architecture's: DeepSeek-V3's sigmoid router for GLM, softmax otherwise.
MoeConfig moe_for(const DecoderConfig& c) {
  MoeConfig moe = c.moe;
  moe.scoring_func = c.architecture == "glm4_moe_lite" ? "sigmoid" : "softmax";
  return moe;
}

// The attention's output width (o_proj's input).
int attention_width(const DecoderConfig& c) {
  return c.num_attention_heads * (c.uses_mla() ? c.mla.v_head_dim : c.head_size());
}

DecoderLayer load_layer(const Weights& w, const DecoderConfig& c, int index) {
  const int h = c.hidden_size, d = c.head_size();
  const int q_out = c.num_attention_heads * d, kv_out = c.kv_heads() * d;
  auto attn = w.sub("self_attn");
  DecoderLayer layer{
      .o_proj = Linear::load(attn.sub("o_proj"), attention_width(c), h, c.attention_bias),
      .input_norm = RMSNorm::load(w.sub("input_layernorm"), h, c.rms_norm_eps),
      .post_attention_norm = RMSNorm::load(w.sub("post_attention_layernorm"), h, c.rms_norm_eps),
  };
  if (c.uses_mla()) {
    layer.mla = MultiLatentAttention::load(attn, h, c.num_attention_heads, c.mla, c.attention_bias);
  } else {
    layer.qkv_proj = FusedLinear::fuse({Linear::load(attn.sub("q_proj"), h, q_out, c.attention_bias),
                                        Linear::load(attn.sub("k_proj"), h, kv_out, c.attention_bias),
                                        Linear::load(attn.sub("v_proj"), h, kv_out, c.attention_bias)});
  }
  if (c.is_sparse_layer(index)) {
    layer.moe = MixtureOfExperts::load(w.sub("mlp"), h, moe_for(c));
  } else {
    layer.mlp = GatedMLP::load(w.sub("mlp"), h, c.intermediate_size, c.mlp_bias);
  }
  if (c.architecture == "qwen3" || c.architecture == "qwen3_moe") {
    layer.q_norm = RMSNorm::load(attn.sub("q_norm"), d, c.rms_norm_eps);
    layer.k_norm = RMSNorm::load(attn.sub("k_norm"), d, c.rms_norm_eps);
  }
  return layer;
}

}  // namespace

bool DecoderConfig::is_sparse_layer(int layer) const {
  if (moe.num_experts <= 0) return false;
  if (!mlp_layer_types.empty()) return mlp_layer_types[layer] == "sparse";
  const bool dense_only = std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end();
  return layer >= first_k_dense_replace && !dense_only && (layer + 1) % decoder_sparse_step == 0;
}

Decoder::Decoder(const DecoderConfig& config, const WeightMap& weights, const QuantMap& quantization)
    : config_((check_config(config), config)),
      embed_tokens_{mx::array(0)},
      norm_{mx::array(0), 0},
      rope_(rope_for(config_)) {
  Weights root(weights, quantization);
  auto model = root.sub("model");
  embed_tokens_ = Embedding::load(model.sub("embed_tokens"), config_.vocab_size, config_.hidden_size);
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    layers_.push_back(load_layer(model.sub("layers." + std::to_string(i)), config_, i));
  }
  norm_ = RMSNorm::load(model.sub("norm"), config_.hidden_size, config_.rms_norm_eps);
  // Some tied checkpoints still carry lm_head.weight; honour the config, as transformers does.
  if (!config_.tie_word_embeddings) {
    lm_head_ = Linear::load(root.sub("lm_head"), config_.hidden_size, config_.vocab_size, false);
  }
}

mx::array Decoder::attention(const DecoderLayer& layer, const mx::array& x, KVCache* cache, int offset,
                             const std::optional<mx::array>& mask) const {
  if (layer.mla) return layer.o_proj((*layer.mla)(x, cache, offset, rope_, mask));
  const int b = x.shape(0), t = x.shape(1), d = config_.head_size();
  const int hq = config_.num_attention_heads, hkv = config_.kv_heads();
  // [B, T, (hq + 2 hkv) D] -> heads [B, T, hq + 2 hkv, D]; q, k, v are views of their head ranges.
  auto qkv = mx::reshape(layer.qkv_proj(x), {b, t, hq + 2 * hkv, d});
  auto heads = [&](int first, int n) {
    return heads_first(mx::slice(qkv, mx::Shape{0, 0, first, 0}, mx::Shape{b, t, first + n, d}));  // [B, n, T, D]
  };
  auto q = heads(0, hq);
  auto k = heads(hq, hkv);
  auto v = heads(hq + hkv, hkv);
  if (layer.q_norm) {
    q = (*layer.q_norm)(q);
    k = (*layer.k_norm)(k);
  }
  q = rope_(q, offset);
  k = rope_(k, offset);
  if (cache) {
    std::tie(k, v) = cache->update_and_fetch(k, v);
  }
  return layer.o_proj(merge_heads(mask ? mlxr::attention(q, k, v, mask) : causal_attention(q, k, v)));
}

mx::array Decoder::layer_forward(const DecoderLayer& layer, const mx::array& x, KVCache* cache, int offset,
                                 const std::optional<mx::array>& mask) const {
  auto h = mx::add(x, attention(layer, layer.input_norm(x), cache, offset, mask));
  auto y = layer.post_attention_norm(h);
  return mx::add(h, layer.moe ? (*layer.moe)(y) : (*layer.mlp)(y));
}

void Decoder::eval_weights() const {
  for (const auto& layer : layers_) {
    std::vector<mx::array> arrays{layer.input_norm.weight, layer.post_attention_norm.weight};
    for (const auto& part :
         {layer.qkv_proj.arrays(), layer.o_proj.arrays(), layer.mla ? layer.mla->arrays() : std::vector<mx::array>{},
          layer.moe ? layer.moe->arrays() : layer.mlp->arrays()}) {
      arrays.insert(arrays.end(), part.begin(), part.end());
    }
    if (layer.q_norm) {
      arrays.push_back(layer.q_norm->weight);
      arrays.push_back(layer.k_norm->weight);
    }
    mx::eval(arrays);
  }
  auto rest = embed_tokens_.arrays();
  rest.push_back(norm_.weight);
  if (lm_head_) {
    auto head = lm_head_->arrays();
    rest.insert(rest.end(), head.begin(), head.end());
  }
  mx::eval(rest);
}

mx::array Decoder::forward(const mx::array& tokens, std::vector<KVCache>& cache) const {
  if (cache.size() != layers_.size()) {
    throw std::invalid_argument("cache has " + std::to_string(cache.size()) + " layers, the model " +
                                std::to_string(layers_.size()));
  }
  const int offset = cache[0].offset();
  auto x = embed_tokens_(tokens);
  for (size_t i = 0; i < layers_.size(); ++i) {
    x = layer_forward(layers_[i], x, &cache[i], offset, std::nullopt);
  }
  x = norm_(x);
  return lm_head_ ? (*lm_head_)(x) : embed_tokens_.as_linear(x);
}

std::vector<mx::array> Decoder::hidden_states(const mx::array& tokens, const std::optional<mx::array>& attention_mask,
                                              const std::vector<int>& layers) const {
  std::optional<mx::array> mask;
  if (attention_mask) mask = causal_padding_key_mask(*attention_mask);
  const int last = *std::max_element(layers.begin(), layers.end());
  if (last > static_cast<int>(layers_.size()) || *std::min_element(layers.begin(), layers.end()) < 0) {
    throw std::invalid_argument("hidden state index out of range 0.." + std::to_string(layers_.size()));
  }
  std::vector<mx::array> all{embed_tokens_(tokens)};
  for (int i = 0; i < last; ++i) {
    all.push_back(layer_forward(layers_[i], all.back(), nullptr, 0, mask));
  }
  std::vector<mx::array> picked;
  const int final_index = static_cast<int>(layers_.size());
  for (int i : layers) {
    // transformers' last hidden state is the final norm's output, the others are raw layer outputs.
    picked.push_back(i == final_index ? norm_(all[i]) : all[i]);
  }
  return picked;
}

}  // namespace mlxr
