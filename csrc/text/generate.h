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

class Generator {
 public:
  Generator(const Decoder& model, const std::vector<int>& prompt, const SamplerOptions& options,
            int prefill_chunk = 512);

  // The next generated token id (the first call also runs the prefill).
  int next();

  int prompt_tokens() const { return static_cast<int>(prompt_.size()); }
  int position() const { return cache_.empty() ? 0 : cache_[0].offset(); }

 private:
  void prefill();
  mx::array step(const mx::array& token);

  const Decoder& model_;
  std::vector<int> prompt_;
  std::vector<KVCache> cache_;
  Sampler sampler_;
  int prefill_chunk_;
  std::optional<mx::array> pending_;
};

// Logits [T, V] (float32) for one prompt, prefilled in chunks: for parity checks.
mx::array prompt_logits(const Decoder& model, const std::vector<int>& tokens, int chunk = 512);

}  // namespace mlxr
