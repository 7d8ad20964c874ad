#include "embed/bert.h"

#include <cmath>
#include <stdexcept>

#include "nn/activation.h"
#include "nn/attention.h"
#include "nn/cpu_kernels.h"

namespace mlxr {

Pooling pooling_from_name(const std::string& name) {
  if (name == "mean") return Pooling::Mean;
  if (name == "cls") return Pooling::Cls;
  if (name == "max") return Pooling::Max;
  if (name == "mean_sqrt_len") return Pooling::MeanSqrtLen;
  throw std::invalid_argument("unsupported pooling '" + name + "' (supported: mean, cls, max, mean_sqrt_len)");
}

namespace {

BertLayer load_layer(const Weights& w, const BertConfig& c) {
  const int h = c.hidden_size;
  return BertLayer{
      .qkv = FusedLinear::fuse({Linear::load(w.sub("attention.self.query"), h, h),
                                Linear::load(w.sub("attention.self.key"), h, h),
                                Linear::load(w.sub("attention.self.value"), h, h)}),
      .attention_out = Linear::load(w.sub("attention.output.dense"), h, h),
      .attention_norm = LayerNorm::load(w.sub("attention.output.LayerNorm"), h, c.layer_norm_eps),
      .intermediate = Linear::load(w.sub("intermediate.dense"), h, c.intermediate_size),
      .output = Linear::load(w.sub("output.dense"), c.intermediate_size, h),
      .output_norm = LayerNorm::load(w.sub("output.LayerNorm"), h, c.layer_norm_eps),
  };
}

void check_config(const BertConfig& c) {
  if (c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0) {
    throw std::invalid_argument("hidden_size " + std::to_string(c.hidden_size) +
                                " is not a positive multiple of num_attention_heads " +
                                std::to_string(c.num_attention_heads));
  }
  if (!is_known_activation(c.hidden_act)) {
    throw std::invalid_argument("unsupported hidden_act '" + c.hidden_act + "'");
  }
}

}  // namespace

BertEncoder::BertEncoder(const BertConfig& config, const WeightMap& weights)
    : config_(config),
      word_embeddings_{mx::array(0)},
      position_embeddings_{mx::array(0)},
      token_type_embeddings_{mx::array(0)},
      embeddings_norm_{mx::array(0), mx::array(0), 0} {
  check_config(config_);
  Weights root(weights);
  if (!root.has("embeddings.word_embeddings.weight") && root.has("bert.embeddings.word_embeddings.weight")) {
    root = root.sub("bert");
  }
  const int h = config_.hidden_size;
  auto emb = root.sub("embeddings");
  word_embeddings_ = Embedding::load(emb.sub("word_embeddings"), config_.vocab_size, h);
  position_embeddings_ = Embedding::load(emb.sub("position_embeddings"), config_.max_position_embeddings, h);
  token_type_embeddings_ = Embedding::load(emb.sub("token_type_embeddings"), config_.type_vocab_size, h);
  embeddings_norm_ = LayerNorm::load(emb.sub("LayerNorm"), h, config_.layer_norm_eps);
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    layers_.push_back(load_layer(root.sub("encoder.layer." + std::to_string(i)), config_));
  }
}

namespace {

// Whether an encoder layer's epilogue (its product's bias, then GELU or the residual and LayerNorm) takes the CPU's
// one-pass kernels: a float32 product with a float32 bias on the CPU.
bool epilogue_on_cpu(const Linear& layer, const mx::array& x) {
  return on_cpu_kernels(x) && layer.bias && layer.bias->dtype() == mx::float32 && layer.dtype() == mx::float32;
}

// norm(layer(h) + residual): BERT's post-norm residual. One pass after the product on the CPU.
mx::array residual_norm(const Linear& layer, const mx::array& h, const mx::array& residual, const LayerNorm& norm) {
  if (epilogue_on_cpu(layer, h) && norm.weight.dtype() == mx::float32 && norm.bias.dtype() == mx::float32) {
    return bias_residual_layer_norm_cpu(layer.product(h), *layer.bias, residual, norm.weight, norm.bias, norm.eps);
  }
  return norm(mx::add(layer(h), residual));
}

// One vector per input from hidden states [B, T, H] under their mask [B, T]: embed()'s and embed_packed()'s end.
mx::array sentence_vectors(const mx::array& hidden, const mx::array& attention_mask, Pooling pooling, bool normalize) {
  auto pooled = pool(hidden, attention_mask, pooling);
  return normalize ? l2_normalize(pooled) : pooled;
}

}  // namespace

mx::array BertEncoder::attention(const BertLayer& layer, const mx::array& x, const Attend& attend) const {
  const int heads = config_.num_attention_heads, h = config_.hidden_size;
  auto qkv = layer.qkv.part_outputs(x, {h, h, h});  // column views of the one product, read in place
  auto q = heads_first(split_heads(qkv[0], heads));
  auto k = heads_first(split_heads(qkv[1], heads));
  auto v = heads_first(split_heads(qkv[2], heads));
  return merge_heads(attend(q, k, v));  // attention_out's input
}

mx::array BertEncoder::feed_forward_input(const BertLayer& layer, const mx::array& x) const {
  if (config_.hidden_act == "gelu" && epilogue_on_cpu(layer.intermediate, x)) {
    return bias_gelu_cpu(layer.intermediate.product(x), *layer.intermediate.bias);
  }
  return activation(config_.hidden_act, layer.intermediate(x));
}

mx::array BertEncoder::embed_tokens(const mx::array& ids, const mx::array& positions, const mx::array& types) const {
  auto x = mx::add(mx::add(word_embeddings_(ids), position_embeddings_(positions)), token_type_embeddings_(types));
  return embeddings_norm_(x);
}

mx::array BertEncoder::encode(mx::array x, const Attend& attend) const {
  for (const auto& layer : layers_) {
    x = residual_norm(layer.attention_out, attention(layer, x, attend), x, layer.attention_norm);
    x = residual_norm(layer.output, feed_forward_input(layer, x), x, layer.output_norm);
  }
  return x;
}

mx::array BertEncoder::forward(const mx::array& input_ids, const mx::array& attention_mask,
                               const std::optional<mx::array>& token_type_ids) const {
  if (input_ids.ndim() != 2 || attention_mask.shape() != input_ids.shape()) {
    throw std::invalid_argument("input_ids and attention_mask must both be [batch, length]; got " +
                                shape_string(input_ids.shape()) + " and " + shape_string(attention_mask.shape()));
  }
  check_length(input_ids.shape(1));
  auto ids = mx::astype(input_ids, mx::int32);
  auto types = token_type_ids ? mx::astype(*token_type_ids, mx::int32) : mx::zeros_like(ids);
  auto x = embed_tokens(ids, mx::arange(input_ids.shape(1), mx::int32), types);
  auto key_mask = padding_key_mask(attention_mask);
  return encode(x, [&](const mx::array& q, const mx::array& k, const mx::array& v) {
    return mlxr::attention(q, k, v, key_mask);
  });
}

mx::array BertEncoder::embed(const mx::array& input_ids, const mx::array& attention_mask, Pooling pooling,
                             bool normalize) const {
  return sentence_vectors(forward(input_ids, attention_mask), attention_mask, pooling, normalize);
}

void BertEncoder::check_length(int length) const {
  if (length > config_.max_position_embeddings) {
    throw std::invalid_argument("input of " + std::to_string(length) + " tokens is longer than the model's " +
                                std::to_string(config_.max_position_embeddings) + " positions");
  }
}

mx::array BertEncoder::embed_sequences(const std::vector<std::vector<int>>& sequences, Pooling pooling,
                                       bool normalize) const {
  if (sequences.empty()) throw std::invalid_argument("embed_sequences needs at least one sequence");
  int longest = 0;
  for (const auto& sequence : sequences) {
    if (sequence.empty()) throw std::invalid_argument("embed_sequences: every sequence needs at least one token");
    longest = std::max(longest, int(sequence.size()));
  }
  check_length(longest);
  if (packs_sequences()) return embed_packed(sequences, pooling, normalize);
  const int batch = int(sequences.size());
  std::vector<int> ids(size_t(batch) * longest, 0), mask(size_t(batch) * longest, 0);
  for (int b = 0; b < batch; ++b) {
    std::copy(sequences[b].begin(), sequences[b].end(), ids.begin() + size_t(b) * longest);
    std::fill_n(mask.begin() + size_t(b) * longest, sequences[b].size(), 1);
  }
  return embed(mx::array(ids.begin(), {batch, longest}), mx::array(mask.begin(), {batch, longest}), pooling, normalize);
}

bool BertEncoder::packs_sequences() const {
  return on_cpu_kernels(word_embeddings_.weight);
}

mx::array BertEncoder::embed_packed(const std::vector<std::vector<int>>& sequences, Pooling pooling,
                                    bool normalize) const {
  const int batch = int(sequences.size());
  std::vector<int> ids, positions, lengths;
  int longest = 0;
  for (const auto& sequence : sequences) {
    ids.insert(ids.end(), sequence.begin(), sequence.end());
    for (int p = 0; p < int(sequence.size()); ++p) positions.push_back(p);
    lengths.push_back(int(sequence.size()));
    longest = std::max(longest, lengths.back());
  }
  const int tokens = int(ids.size());
  auto row = [tokens](const std::vector<int>& v) { return mx::array(v.begin(), {1, tokens}); };
  auto x = embed_tokens(row(ids), row(positions), mx::zeros({1, tokens}, mx::int32));
  auto hidden = encode(x, [&](const mx::array& q, const mx::array& k, const mx::array& v) {
    return packed_attention_cpu(q, k, v, scale_or_default(std::nullopt, q), lengths);
  });
  // Pooling reads [B, longest, H] under a mask: each sequence's rows gathered from the packed ones (the padding
  // slots read the sequence's first row, which the mask then leaves out).
  std::vector<int> rows(size_t(batch) * longest), mask(size_t(batch) * longest, 0);
  for (int b = 0, first = 0; b < batch; first += lengths[b], ++b) {
    for (int t = 0; t < longest; ++t) {
      rows[size_t(b) * longest + t] = first + (t < lengths[b] ? t : 0);
      mask[size_t(b) * longest + t] = t < lengths[b];
    }
  }
  auto padded = mx::take(mx::squeeze(hidden, 0), mx::array(rows.begin(), {batch, longest}), 0);
  return sentence_vectors(padded, mx::array(mask.begin(), {batch, longest}), pooling, normalize);
}

mx::array pool(const mx::array& hidden, const mx::array& attention_mask, Pooling pooling) {
  auto h = mx::astype(hidden, mx::float32);
  auto mask = mx::expand_dims(mx::astype(attention_mask, mx::float32), -1);  // [B, T, 1]
  switch (pooling) {
    case Pooling::Cls:
      return mx::take(h, mx::array(0), 1);
    case Pooling::Max: {
      // Padding can never win the max (sentence-transformers sets it to -1e9).
      auto masked = mx::where(mx::greater(mask, mx::array(0.0f)), h, mx::array(-1e9f));
      return mx::max(masked, 1);
    }
    case Pooling::Mean:
    case Pooling::MeanSqrtLen: {
      auto summed = mx::sum(mx::multiply(h, mask), 1);
      auto count = mx::maximum(mx::sum(mask, 1), mx::array(1e-9f));
      return pooling == Pooling::Mean ? mx::divide(summed, count) : mx::divide(summed, mx::sqrt(count));
    }
  }
  throw std::logic_error("unreachable pooling mode");
}

mx::array l2_normalize(const mx::array& x) {
  auto norm = mx::sqrt(mx::sum(mx::square(x), -1, true));
  return mx::divide(x, mx::maximum(norm, mx::array(1e-12f, x.dtype())));
}

}  // namespace mlxr
