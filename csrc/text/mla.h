// Multi-head latent attention (MLA) of DeepSeek-V2/V3 and GLM-4.7-Flash.
//
// Keys and values come from one small latent per token: x -> kv_a_proj -> [latent (kv_lora_rank) |
// k_rope (qk_rope_head_dim)]. Each head's key is [W_k latent | k_rope] (k_rope shared by all heads,
// the only part RoPE rotates) and its value W_v latent, with W_k, W_v the rows of kv_b_proj. Queries
// go through a LoRA-style down/up pair too (q_a_proj, q_b_proj) when q_lora_rank is set.
//
// The cache holds only the latent and k_rope (a KVCache whose "keys" are latents [B, 1, T, rank] and
// "values" rope keys [B, 1, T, rope]), not per-head keys and values. Decoding attends in latent space:
// q_nope W_k scores the latents directly and the output goes through W_v after the weighted sum
// ("absorbed" attention), so a step reads the cache once, for all heads. A prefill chunk of many
// queries expands keys and values per head instead, which costs fewer operations there (mlx-lm's split).
#pragma once

#include <optional>

#include "nn/config_fields.h"
#include "nn/linear.h"
#include "nn/norm.h"
#include "nn/rope.h"
#include "text/kv_cache.h"

namespace mlxr {

// config.json's MLA fields; defaults: transformers' Glm4MoeLiteConfig (GLM-4.7-Flash).
struct MlaConfig {
  std::optional<int> q_lora_rank = 768;  // null: queries from one q_proj
  int kv_lora_rank = 512;
  int qk_rope_head_dim = 64;
  int qk_nope_head_dim = 192;
  int v_head_dim = 256;
  bool rope_interleave = true;  // RoPE on interleaved pairs (as DeepSeek lays the rope dims out)

  MLXR_CONFIG_FIELDS(MlaConfig, q_lora_rank, kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim,
                     rope_interleave)
};

void check_mla_config(const MlaConfig& config);

struct MultiLatentAttention {
  std::optional<Linear> q_proj;              // without q_lora_rank
  std::optional<Linear> q_a_proj, q_b_proj;  // with it
  std::optional<RMSNorm> q_a_norm;
  Linear kv_a_proj;
  RMSNorm kv_a_norm;
  mx::array k_up;  // [H, qk_nope_head_dim, kv_lora_rank]: kv_b_proj's key rows per head (mlx-lm: embed_q)
  mx::array v_up;  // [H, v_head_dim, kv_lora_rank]: its value rows (mlx-lm: unembed_out)
  int heads;
  MlaConfig config;
  float scale;  // the attention logits': (qk_nope_head_dim + qk_rope_head_dim)^-0.5, times YaRN's if any

  // `w`: the layer's self_attn. `bias`: attention_bias (q_a_proj and kv_a_proj). `rope`: the decoder's RoPE,
  // whose DeepSeek-style YaRN scales the attention logits too (yarn_softmax_scale).
  static MultiLatentAttention load(const Weights& w, int hidden_size, int heads, const MlaConfig& config, bool bias,
                                   const RopeConfig& rope);

  // x [B, T, hidden] appended after what `cache` holds (none: attend within x) -> [B, T, H * v_head_dim],
  // before the output projection. `mask` (boolean, broadcast to [B, H, T, keys]) replaces the causal one.
  mx::array operator()(const mx::array& x, KVCache* cache, int offset, const Rope& rope,
                       const std::optional<mx::array>& mask) const;
  std::vector<mx::array> arrays() const;
};

}  // namespace mlxr
