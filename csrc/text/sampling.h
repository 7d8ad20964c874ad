// Logits -> token, in Ollama's order (docs/models/llm.md):
//   1. penalties on raw logits over the last `repeat_last_n` tokens (prompt + generated):
//      repeat (x rp if negative, / rp otherwise) and presence (-p), once per distinct token;
//      frequency (-f per occurrence);
//   2. temperature <= 0 -> argmax;
//   3. top_k (0 < k < V) keeps the k best, then softmax(z / T) in float32;
//   4. top_p keeps a token while the mass strictly before it is < p (the best always stays);
//   5. min_p drops probabilities < min_p * max;
//   6. draw from what is left; seeded draws use key(SplitMix64(seed, n)) for the n-th draw, so
//      the same seed and prompt give the same text, independent of anything else in the process.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "nn/config_fields.h"
#include "nn/weights.h"

namespace mlxr {

// A request's sampling options; defaults as Ollama's (api/types.go DefaultOptions), what the runner
// uses for an option a request leaves out.
struct SamplerOptions {
  float temperature = 0.8f;
  int top_k = 40;      // 0 = off
  float top_p = 0.9f;  // 1 = off
  float min_p = 0.0f;  // 0 = off
  float repeat_penalty = 1.1f;
  int repeat_last_n = 64;  // 0 = no penalties
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::optional<uint64_t> seed;  // none = MLX's global generator

  MLXR_CONFIG_FIELDS(SamplerOptions, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty,
                     frequency_penalty, seed)
};

uint64_t splitmix64(uint64_t seed, uint64_t counter);

// The greedy token(s) as int32: argmax of z [V] (a scalar) or of each row of z [rows, V]. On CUDA one kernel of ours
// (nn/cuda_argmax.h: MLX's argmax is a single block's slow scan plus a cast); elsewhere MLX's argmax, cast.
mx::array greedy_tokens(const mx::array& z);

class Sampler {
 public:
  Sampler(const SamplerOptions& options, int vocab_size);

  // Remember tokens for the penalties (the prompt, then each sampled token). Lazy arrays are fine.
  void remember(const mx::array& tokens);
  // The same for token ids on the host (a prompt). Without penalties no array is made: on CUDA an array made from
  // host memory is a fresh unified-memory buffer, an allocation and a synchronous copy before the request's first
  // kernel, for a history nothing reads.
  void remember(const std::vector<int>& tokens);

  // Logits [V] -> token id (a lazy int32 scalar); remembers it.
  mx::array sample(const mx::array& logits);
  // The same draw without remembering it; `bias` [V] (0 or -inf: a constraint's mask) is added to the penalised
  // logits first. The caller remembers the token it keeps.
  mx::array choose(const mx::array& logits, const std::optional<mx::array>& bias = std::nullopt);

  // A bias [V] (float32) added to the penalised logits of every draw: OpenAI's logit_bias. None by default.
  void set_bias(const mx::array& bias);
  bool biased() const { return bias_.has_value(); }

  // The penalty history, and putting it back: a generator that remembered a token it then takes back.
  std::optional<mx::array> history() const { return history_; }
  void restore_history(std::optional<mx::array> history) { history_ = std::move(history); }

  // The distribution step 6 draws from, as float32 probabilities [V] (for tests and logprobs).
  mx::array probabilities(const mx::array& logits) const;

  bool greedy() const { return options_.temperature <= 0.0f; }
  bool uses_penalties() const;

 private:
  mx::array penalized(const mx::array& logits) const;
  mx::array distribution(const mx::array& penalized_logits) const;  // steps 3-5
  mx::array draw(const mx::array& logprobs);

  SamplerOptions options_;
  int vocab_size_;
  std::optional<mx::array> history_;  // int32 [<= repeat_last_n]
  std::optional<mx::array> bias_;     // float32 [V]
  uint64_t draws_ = 0;
};

}  // namespace mlxr
