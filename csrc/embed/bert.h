// BERT encoder (BertModel as in transformers), used by sentence-transformers models such as
// all-MiniLM-L6-v2: embeddings + LayerNorm, post-norm encoder layers with a padding mask,
// and pooling of the last hidden state into one vector per input.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "nn/config_fields.h"
#include "nn/linear.h"
#include "nn/norm.h"

namespace mlxr {

// config.json; defaults as transformers' BertConfig (5.x).
struct BertConfig {
  int vocab_size = 30522;
  int hidden_size = 768;
  int num_hidden_layers = 12;
  int num_attention_heads = 12;
  int intermediate_size = 3072;
  int max_position_embeddings = 512;
  int type_vocab_size = 2;
  float layer_norm_eps = 1e-12f;
  std::string hidden_act = "gelu";

  MLXR_CONFIG_FIELDS(BertConfig, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
                     max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_act)
};

struct BertLayer {
  FusedLinear qkv;  // query | key | value: one product (each output column the same sum as its own layer's)
  Linear attention_out;
  LayerNorm attention_norm;
  Linear intermediate, output;
  LayerNorm output_norm;
};

// How token states become one vector (sentence-transformers' Pooling module).
enum class Pooling { Mean, Cls, Max, MeanSqrtLen };
Pooling pooling_from_name(const std::string& name);

class BertEncoder {
 public:
  // `weights` are BertModel's tensors; a leading "bert." (BertFor* checkpoints) is accepted.
  BertEncoder(const BertConfig& config, const WeightMap& weights);

  // Last hidden state [B, T, H] for token ids [B, T] and mask [B, T] (1 = token, 0 = padding).
  mx::array forward(const mx::array& input_ids, const mx::array& attention_mask,
                    const std::optional<mx::array>& token_type_ids = std::nullopt) const;

  // One vector per input: [B, H], pooled over the unmasked tokens, optionally L2-normalised.
  mx::array embed(const mx::array& input_ids, const mx::array& attention_mask, Pooling pooling, bool normalize) const;

  // embed() of token id sequences of any lengths (each at least one token). On the CPU kernels (float32 on the CPU)
  // the network runs on their tokens back to back, without padding: each sequence attends to itself only, and no
  // product or norm spends work on padding (32 sentences of 13-18 tokens: 493 tokens where padding makes 576).
  // Elsewhere they are padded to the longest for embed().
  mx::array embed_sequences(const std::vector<std::vector<int>>& sequences, Pooling pooling, bool normalize) const;
  // Whether embed_sequences runs its sequences back to back (no padding) on the current device.
  bool packs_sequences() const;

  const BertConfig& config() const { return config_; }
  mx::Dtype dtype() const { return word_embeddings_.weight.dtype(); }

 private:
  // softmax(q k^T / sqrt(D)) v over q, k, v [B, heads, T, D]: padded inputs' masked attention, or packed
  // sequences' attention each within itself.
  using Attend = std::function<mx::array(const mx::array& q, const mx::array& k, const mx::array& v)>;

  // Embeddings + LayerNorm of token ids [B, T] at `positions` [T] or [B, T], with token types [B, T].
  mx::array embed_tokens(const mx::array& ids, const mx::array& positions, const mx::array& types) const;
  // The encoder layers over x [B, T, H].
  mx::array encode(mx::array x, const Attend& attend) const;
  // Self-attention's heads merged: the input of the layer's attention_out product.
  mx::array attention(const BertLayer& layer, const mx::array& x, const Attend& attend) const;
  // Throws when `length` tokens are more than the model's positions.
  void check_length(int length) const;
  // embed_sequences() on the CPU kernels: the sequences' tokens in one row, then pooled per sequence.
  mx::array embed_packed(const std::vector<std::vector<int>>& sequences, Pooling pooling, bool normalize) const;
  // activation(intermediate(x)): the input of the layer's output product.
  mx::array feed_forward_input(const BertLayer& layer, const mx::array& x) const;

  BertConfig config_;
  Embedding word_embeddings_, position_embeddings_, token_type_embeddings_;
  LayerNorm embeddings_norm_;
  std::vector<BertLayer> layers_;
};

// Pooling of hidden states [B, T, H] with mask [B, T] -> [B, H] (float32).
mx::array pool(const mx::array& hidden, const mx::array& attention_mask, Pooling pooling);

// Row-wise L2 normalisation as torch.nn.functional.normalize (eps 1e-12).
mx::array l2_normalize(const mx::array& x);

}  // namespace mlxr
