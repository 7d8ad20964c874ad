// Decoder-only transformers of the Llama family: Llama 2/3 (GQA, RoPE scaling, tied or untied
// embeddings), Qwen3 (the same plus RMSNorm on queries and keys per head), Mistral / Ministral (Llama
// with sliding-window attention on some or all layers), Gemma 3's text model (scaled embeddings,
// (1 + w) RMSNorms, four per layer, q/k norms, GELU-tanh, its own attention scale, sliding and global
// layers with their own RoPE), Qwen3-MoE (Qwen3 with routed experts), GLM-4.7-Flash (multi-head
// latent attention, routed and shared experts) and GPT-OSS (attention sinks and biases, alternating
// sliding and full layers, YaRN, biased clamped-SwiGLU experts). One network serves text generation and, through
// hidden_states(), the image pipelines' Qwen3 text encoder.
#pragma once

#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "nn/config_fields.h"
#include "nn/cuda_decode_attention.h"
#include "nn/linear.h"
#include "nn/moe.h"
#include "nn/norm.h"
#include "nn/rope.h"
#include "text/kv_cache.h"
#include "text/mla.h"

namespace mlxr {

// config.json (LlamaConfig / Qwen3Config / MistralConfig / Gemma3TextConfig / Qwen3MoeConfig /
// Glm4MoeLiteConfig / GptOssConfig); defaults as transformers' LlamaConfig (5.x), and for the others as their own
// config classes: defaults(architecture). `architecture` comes from config.json's "architectures", `rope` and
// `sliding_rope` from its rope_theta and rope_parameters, `moe` and `mla` from its top-level keys (Python
// translates them: llm/architectures.py).
struct DecoderConfig {
  std::string architecture = "llama";  // llama | qwen3 | mistral | gemma3 | qwen3_moe | glm4_moe_lite | gpt_oss
  int vocab_size = 32000;
  int hidden_size = 4096;
  int num_hidden_layers = 32;
  int num_attention_heads = 32;
  int num_key_value_heads = 0;  // 0 (config null): num_attention_heads
  int head_dim = 0;             // 0 (config null): hidden_size / num_attention_heads
  int intermediate_size = 11008;
  float rms_norm_eps = 1e-6f;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  RopeConfig rope;
  // Sliding-window attention (Mistral, Ministral, Gemma 3). Which layers slide: those layer_types
  // names "sliding_attention" when it is given; else (Gemma 3 as the Hub saves it) all but every
  // sliding_window_pattern-th; else every layer when sliding_window is set (Mistral).
  int sliding_window = 0;                // W: a token sees itself and the W - 1 before it; 0: no window
  std::vector<std::string> layer_types;  // per layer: sliding_attention | full_attention
  int sliding_window_pattern = 0;
  RopeConfig sliding_rope;  // the sliding layers' RoPE: Gemma 3's local base; the others' is rope's
  // Gemma 3 (and any decoder that sets them).
  std::string hidden_act = "silu";       // the MLP gate's activation (Gemma's hidden_activation)
  float query_pre_attn_scalar = 0.0f;    // attention scale query_pre_attn_scalar^-0.5; 0: head_dim^-0.5
  float final_logit_softcapping = 0.0f;  // logits -> cap * tanh(logits / cap); 0: none
  // Mixture of experts: which layers route (the others run a dense MLP of intermediate_size).
  // transformers 5 lists them (mlp_layer_types, "dense" | "sparse"); otherwise Qwen3-MoE's rule (layer i
  // routes when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers) after DeepSeek's
  // first_k_dense_replace dense layers.
  MoeConfig moe;
  std::vector<std::string> mlp_layer_types;
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;
  int first_k_dense_replace = 0;
  MlaConfig mla;  // glm4_moe_lite's attention

  MLXR_CONFIG_FIELDS(DecoderConfig, architecture, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                     num_key_value_heads, head_dim, intermediate_size, rms_norm_eps, tie_word_embeddings,
                     attention_bias, mlp_bias, rope, sliding_window, layer_types, sliding_window_pattern, sliding_rope,
                     hidden_act, query_pre_attn_scalar, final_logit_softcapping, moe, mlp_layer_types,
                     decoder_sparse_step, mlp_only_layers, first_k_dense_replace, mla)

  // The defaults of an architecture's transformers config class (a sparse config.json, as Gemma 3's
  // text_config on the Hub, relies on them).
  static DecoderConfig defaults(const std::string& architecture);

  int kv_heads() const { return num_key_value_heads > 0 ? num_key_value_heads : num_attention_heads; }
  int head_size() const {
    if (head_dim > 0) return head_dim;
    return num_attention_heads > 0 ? hidden_size / num_attention_heads : 0;
  }
  bool uses_mla() const { return architecture == "glm4_moe_lite"; }
  bool is_sparse_layer(int layer) const;
  // Layer i's sliding window; 0: it attends to every earlier position.
  int window(int layer) const;
};

// The checkpoint's q/k/v projections are stored as one fused [q | k | v] layer, and gate/up as one
// [gate | up] layer: at batch 1 a decode token is bound by MLX's per-kernel cost, and this makes
// it two matmuls fewer per layer than the checkpoint's seven. The outputs are the same numbers.
// With a mixed-precision checkpoint (say v_proj at more bits than q_proj) a fused projection holds one
// matmul per run of alike parts instead (FusedLinear).
struct DecoderLayer {
  // Attention: standard (qkv_proj), or multi-head latent attention (mla; qkv_proj empty). o_proj either way.
  FusedLinear qkv_proj;
  std::optional<MultiLatentAttention> mla;
  Linear o_proj;
  std::optional<RMSNorm> q_norm, k_norm;  // Qwen3, Gemma 3
  std::optional<mx::array> sinks;         // GPT-OSS: one attention-sink logit per query head
  RMSNorm input_norm, post_attention_norm;
  // Gemma 3: post_attention_norm normalises the attention's output, these the MLP's input and output.
  std::optional<RMSNorm> pre_feedforward_norm, post_feedforward_norm;
  // Feed-forward: a dense MLP or a mixture of experts (exactly one is set).
  std::optional<GatedMLP> mlp;
  std::optional<MixtureOfExperts> moe;
  int window = 0;  // sliding-window attention over this many positions; 0: full attention
};

class Decoder {
 public:
  // `quantization` lists the packed weights of a quantized checkpoint (any linear and the token
  // embedding; nn/weights.h); they stay packed, and a tied LM head multiplies with the packed table.
  Decoder(const DecoderConfig& config, const WeightMap& weights, const QuantMap& quantization = {});

  // Logits [B, T, V] for tokens [B, T] appended after what `cache` holds (one cache per layer); last_only: those of
  // the last position, [B, 1, V] (a prompt's last chunk: only its last token's logits are sampled).
  mx::array forward(const mx::array& tokens, std::vector<KVCache>& cache, bool last_only = false) const;

  // Hidden states as transformers' output_hidden_states: index 0 the embeddings, index i the
  // output of the first i layers, and index num_hidden_layers the final norm's output; `layers`
  // picks which. `attention_mask` [B, T] (1 = token)
  // masks padding keys on top of causal attention. No cache. final_norm = false: index num_hidden_layers is the
  // last layer's raw output (a decoder built with only the first layers of a checkpoint, as a text encoder that
  // reads an inner layer is).
  std::vector<mx::array> hidden_states(const mx::array& tokens, const std::optional<mx::array>& attention_mask,
                                       const std::vector<int>& layers, bool final_norm = true) const;

  // One cache per layer: a rotating one (text/kv_cache.h) on each sliding-window layer.
  std::vector<KVCache> make_cache() const;

  // Whether forward_batch can run this model: no layer keeps a latent (MLA) cache or has attention sinks (GPT-OSS).
  // Those models decode one sequence at a time.
  bool can_batch() const;

  // A batch step's sliding-window layers (BatchKVCache's rotating rows): each row's slot for its new position
  // (int32 [B]), the last slot it then sees (int32 [B]), the most slots a row then holds, and the mask [B, 1, 1,
  // visible] of each row's own slots (none when every row holds as many).
  struct WindowStep {
    mx::array slots;
    mx::array last_slots;
    int visible;
    std::optional<mx::array> mask;
  };

  // One decode step of B sequences of different lengths: logits [B, 1, V] for tokens [B, 1]. Row b's new
  // token sits at position positions[b] (int32 [B], also its RoPE offset); each full layer's BatchKVCache
  // (text/kv_cache.h) writes its keys there and returns the first `visible` keys of every row (the longest
  // row's), which `mask` ([B, 1, 1, visible], true = a key of that row) cuts to the row's own; no mask when
  // every row sees all of them (rows of one length). Sliding-window layers write and see as `window` says (set
  // when the model has such layers).
  mx::array forward_batch(const mx::array& tokens, const mx::array& positions, int visible,
                          const std::optional<mx::array>& mask, std::vector<BatchKVCache>& cache,
                          const std::optional<WindowStep>& window = std::nullopt) const;

  // Reads every weight now, one layer at a time. The fused projections are lazy concatenations
  // of the checkpoint's arrays; once the caller has dropped its own references to those, this
  // frees each layer's originals as soon as its fused copy exists, so loading never holds two
  // copies of the model.
  void eval_weights() const;
  const DecoderConfig& config() const { return config_; }

 private:
  class LayerInput;
  // Attention's queries, keys and values [B, heads, T, D] from the layer's input: projected, heads split, q/k norms
  // and RoPE (at `offset`, an int or a position per row) applied; on CUDA the norms and RoPE are one kernel
  // (nn/cuda_norm_rope.h).
  // device_offset: `offset` as an int32 [1] made on the device, for the CUDA kernel (device_offset() below).
  // rope_in_attention: given where the cache may be written in place; where an attention kernel takes the step and can
  // make the norms and RoPE itself, *rope_in_attention says how, and for a decode step q and k are returned as
  // projected (views of the product's heads), for a short chunk (unless MLXRUNNER_CHUNK_ROPE=0) q, k and v are all the
  // q|k|v product [1, T, (q_heads + 2 kv_heads) D] itself, which the chunk kernel reads in place.
  template <typename Offset>
  std::tuple<mx::array, mx::array, mx::array> project_qkv(const DecoderLayer& layer, LayerInput& input,
                                                          const Rope& rope, const Offset& offset,
                                                          const std::optional<mx::array>& device_offset = std::nullopt,
                                                          std::optional<DecodeRope>* rope_in_attention = nullptr) const;
  mx::array attention(const DecoderLayer& layer, LayerInput& input, KVCache* cache, int offset,
                      const std::optional<mx::array>& mask,
                      const std::optional<mx::array>& device_offset = std::nullopt) const;
  std::optional<mx::array> attention_in_cache(const mx::array& q, const mx::array& k, const mx::array& v,
                                              KVCache& cache, int offset, const std::optional<mx::array>& device_offset,
                                              const std::optional<DecodeRope>& rope = std::nullopt) const;
  // A forward's first position as the fused q/k kernel reads it, on CUDA: made by the device once a forward and read
  // by every layer. An array made from a host int is a page of host memory there, which each layer's kernel would read
  // across the bus. nullopt off CUDA, without the fused RoPE, or under MLXRUNNER_DEVICE_OFFSET=0 (to measure it).
  std::optional<mx::array> device_offset(int offset) const;
  mx::array batch_attention(const DecoderLayer& layer, LayerInput& input, BatchKVCache& cache,
                            const mx::array& positions, int visible, const std::optional<mx::array>& mask,
                            const std::optional<WindowStep>& window) const;
  // attention() of one prompt right-padded after its first `real` tokens, under transformers' padding mask (causal,
  // pad keys unseen), as the two parts that mask leaves: the real tokens attending to each other causally, the pads
  // attending to every real token. A text encoder's 24 tokens padded to 512 then make 24 x 24 and 488 x 24 scores
  // where the masked attention made 512 x 512 and a select over them.
  mx::array right_padded_attention(const DecoderLayer& layer, LayerInput& input, int real) const;
  // A layer's output as base + delta, the sum left to the next RMSNorm: on CUDA the residual add and the norm
  // after it are one kernel (RMSNorm::add_then_norm). No delta: base is the sum.
  struct Residual {
    mx::array base;
    std::optional<mx::array> delta;
    mx::array sum() const { return delta ? mx::add(base, *delta) : base; }
    std::vector<mx::array> arrays() const { return delta ? std::vector{base, *delta} : std::vector{base}; }
    // (the sum, norm of it): one kernel on CUDA when there is a sum to make.
    std::pair<mx::array, mx::array> sum_and_norm(const RMSNorm& norm) const {
      if (delta) return norm.add_then_norm(base, *delta);
      return {base, norm(base)};
    }
  };
  // What a block of a layer reads: RMSNorm(base + delta), made when first asked for. A packed decode step's
  // projection makes the sum and the norm in its own kernel (FusedLinear::normed_product,
  // GatedMLP::normed_activated): on CUDA two operations a layer fewer, where a decode step is bound by MLX's cost
  // per operation. sum() is the residual stream the layer goes on with.
  class LayerInput {
   public:
    LayerInput(Residual in, const RMSNorm& norm) : in_(std::move(in)), norm_(norm) {}
    const mx::array& normed();
    mx::array project(const FusedLinear& projection);
    // A q|k|v projection's heads ready for attention, made with the norm in one kernel (FusedLinear::normed_heads)
    // while the norm is not yet made; nullopt otherwise.
    std::optional<QkvHeads> project_heads(const FusedLinear& projection, const HeadSplit& split);
    mx::array activate(const GatedMLP& mlp);
    const mx::array& sum();

   private:
    NormInput norm_input() const { return {in_.base, in_.delta, norm_.weight, norm_.eps}; }
    void made_here();  // the sum and the norm as operations of their own

    Residual in_;
    const RMSNorm& norm_;
    std::optional<mx::array> sum_, normed_;
  };
  // A layer around its attention: `attend` maps the layer's input to the attention's output.
  using Attend = std::function<mx::array(LayerInput&)>;
  Residual layer_forward(const DecoderLayer& layer, const Residual& x, const Attend& attend) const;
  mx::array logits(const Residual& x) const;
  // Whether a forward over `embedded` evaluates layer by layer (LayerPacer in decoder.cpp): a packed model's many-row
  // products multiply dequantized copies of its weights.
  bool paced(const mx::array& embedded) const;
  mx::array mlp(const DecoderLayer& layer, LayerInput& input) const;
  mx::array embed(const mx::array& tokens) const;

  DecoderConfig config_;
  Embedding embed_tokens_;
  std::vector<DecoderLayer> layers_;
  RMSNorm norm_;
  std::optional<Linear> lm_head_;  // absent when tied to embed_tokens
  Rope rope_;
  Rope sliding_rope_;
  std::optional<float> attention_scale_;  // unset: 1 / sqrt(head_dim)
  bool packed_ = false;                   // a quantized checkpoint's weights
};

}  // namespace mlxr
