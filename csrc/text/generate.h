// The generation loop: chunked prefill, then decoding one token ahead of the host.
//
// Each next() dispatches the forward pass for the token after the one it returns (async_eval)
// before it reads that token back, so the device computes step n+1 while the host streams
// token n (mlx-lm's and Ollama's scheme). Stopping is the caller's: it simply stops calling.
#pragma once

#include <vector>

#include "text/decoder.h"
#include "text/sampling.h"

namespace mlxr {

// How likely the model found one generated token: log-softmax of its raw logits (before penalties,
// temperature and truncation, as vLLM and OpenAI report them), and the `top` most likely tokens.
struct TokenLogprobs {
  float logprob = 0.0f;
  std::vector<int> top_ids;  // best first
  std::vector<float> top_logprobs;
};

class Generator {
 public:
  // top_logprobs: -1 = no log-probabilities; k >= 0 = each token's, and its k most likely alternatives.
  Generator(const Decoder& model, const std::vector<int>& prompt, const SamplerOptions& options,
            int prefill_chunk = 512, int top_logprobs = -1);

  // The next generated token id (the first call also runs the prefill).
  int next();

  // The log-probabilities of the token the last next() returned (when asked for at construction).
  const std::optional<TokenLogprobs>& logprobs() const { return logprobs_; }

  int prompt_tokens() const { return static_cast<int>(prompt_.size()); }
  int position() const { return cache_.empty() ? 0 : cache_[0].offset(); }

 private:
  void prefill();
  mx::array step(const mx::array& token);
  void sample(const mx::array& logits);  // sets pending_ (and pending_logprobs_)

  struct PendingLogprobs {
    mx::array chosen;      // float32 scalar: the sampled token's
    mx::array top_ids;     // uint32 [k], in no order
    mx::array top_values;  // float32 [k]
  };
  static TokenLogprobs read_logprobs(const PendingLogprobs& pending);

  const Decoder& model_;
  std::vector<int> prompt_;
  std::vector<KVCache> cache_;
  Sampler sampler_;
  int prefill_chunk_;
  int top_logprobs_;
  std::optional<mx::array> pending_;
  std::optional<PendingLogprobs> pending_logprobs_;  // for pending_
  std::optional<TokenLogprobs> logprobs_;
};

// Logits [T, V] (float32) for one prompt, prefilled in chunks: for parity checks.
mx::array prompt_logits(const Decoder& model, const std::vector<int>& tokens, int chunk = 512);

}  // namespace mlxr
