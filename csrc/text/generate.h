// The generation loop: chunked prefill, then decoding one token ahead of the host.
//
// Each next() dispatches the forward pass for the token after the one it returns (async_eval)
// before it reads that token back, so the device computes step n+1 while the host streams
// token n (mlx-lm's and Ollama's scheme). Stopping is the caller's: it simply stops calling.
#pragma once

#include <vector>

#include "text/decoder.h"
#include "text/sampling.h"
#include "text/token_constraint.h"

namespace mlxr {

// How likely the model found one generated token: log-softmax of its raw logits (before penalties,
// temperature and truncation, as vLLM and OpenAI report them), and the `top` most likely tokens.
struct TokenLogprobs {
  float logprob = 0.0f;
  std::vector<int> top_ids;  // best first
  std::vector<float> top_logprobs;
};

// A token's log-probabilities while still lazy: computed with the token, read on the host after it.
struct PendingLogprobs {
  mx::array chosen;      // float32 scalar: the sampled token's
  mx::array top_ids;     // uint32 [k], in no order
  mx::array top_values;  // float32 [k]

  // From one row's raw logits [V], the token sampled from them and how many alternatives (k >= 0).
  static PendingLogprobs of(const mx::array& logits, const mx::array& token, int k);
  std::vector<mx::array> arrays() const { return {chosen, top_ids, top_values}; }
  TokenLogprobs read() const;  // sorted best first
};

class Generator {
 public:
  // top_logprobs: -1 = no log-probabilities; k >= 0 = each token's, and its k most likely alternatives.
  // start: caches that already hold the prompt's first start->length() tokens (fewer than all of them: the
  // last one must run to give logits), from the prompt cache; the prefill begins after them. Taken (moved from) only
  // once every argument has been checked: a generator that refuses its arguments leaves start as it was.
  // max_tokens: the answer's budget (-1: none). next() dispatches no step past the budget's last token (a
  // forward pass whose token nobody reads), so the caches then hold every returned token but the last.
  // logit_bias: [V] added to every draw's logits (OpenAI's logit_bias).
  // json: hold the answer to one JSON object, over this vocabulary; json_schema: to what that schema allows (both
  // kept alive by the caller). Such a generator decodes ahead on the guess that each draw is allowed, and takes
  // the step back when it is not (next_json).
  Generator(const Decoder& model, const std::vector<int>& prompt, const SamplerOptions& options,
            int prefill_chunk = 512, int top_logprobs = -1, std::optional<SequenceCache>&& start = std::nullopt,
            int max_tokens = -1, const TokenVocabulary* json = nullptr, const JsonSchema* json_schema = nullptr,
            std::optional<mx::array> logit_bias = std::nullopt);

  // Prefill the next chunk of the prompt; returns how many prompt tokens are still to prefill (0: only the
  // last one is left, which the first next() runs). The caller may stop between chunks (cancel).
  int prefill_chunk();
  // Prompt tokens not yet in the caches (the last one included).
  int prompt_left() const { return static_cast<int>(prompt_.size()) - position(); }

  // The next generated token id; not once exhausted(). The first call runs what is left of the prompt: whole
  // chunks first, then the rest (at most a chunk, the last token included) as one forward whose last row gives
  // the first token. A caller that wants to stop between chunks prefills while prompt_left() > the chunk.
  int next();
  // Whether next() has returned max_tokens tokens.
  bool exhausted() const { return max_tokens_ >= 0 && returned_ >= max_tokens_; }
  // Whether a generator held to JSON has written its whole object (the answer ends there).
  bool json_complete() const { return json_ && json_->complete(); }

  // The caches, moved out: they hold the prompt and every token next() has returned (position() of them).
  // The generator is finished after this. (Taken, not copied: while a copy is alive each write would copy
  // the buffers.)
  SequenceCache take_cache();

  // What a batch (BatchGenerator::join) takes over from a generator whose next() has returned its last token with
  // nothing dispatched after it (exhausted()): the caches (the prompt and every returned token but the last), the
  // sampler (its penalty history and draws), and the last token, the sequence's next input. The generator is
  // finished after this.
  struct Started {
    SequenceCache cache;
    Sampler sampler;
    int next_input;
  };
  Started hand_off();
  int top_logprobs() const { return top_logprobs_; }
  const Decoder& model() const { return model_; }

  // The log-probabilities of the token the last next() returned (when asked for at construction).
  const std::optional<TokenLogprobs>& logprobs() const { return logprobs_; }

  int prompt_tokens() const { return static_cast<int>(prompt_.size()); }
  int position() const { return cache_.empty() ? 0 : cache_[0].offset(); }

 private:
  mx::array step(const mx::array& token);
  mx::array first_logits();                 // the rest of the prompt, its last row's logits
  void sample(const mx::array& logits);     // sets pending_ (and pending_logprobs_)
  int next_json();                          // next() for a generator held to JSON
  void draw_json(const mx::array& logits);  // sets pending_ (drawn without the mask) and pending_logits_
  bool speculates_json() const;

  const Decoder& model_;
  std::vector<int> prompt_;
  std::vector<KVCache> cache_;
  Sampler sampler_;
  int prefill_chunk_;
  int top_logprobs_;
  int max_tokens_;
  int returned_ = 0;     // tokens next() has returned
  int last_token_ = -1;  // the last of them
  std::optional<mx::array> pending_;
  std::optional<mx::array> pending_logits_;  // held to JSON: the logits pending_ was drawn from
  // Held to JSON: the share of recent draws refused (each new draw weighs a quarter); below kJsonGuessBelow the
  // next step is dispatched before the draw is checked.
  float json_refusals_ = 0.0f;
  static constexpr float kJsonGuessBelow = 0.25f;
  std::optional<PendingLogprobs> pending_logprobs_;  // for pending_
  std::optional<TokenLogprobs> logprobs_;
  std::optional<JsonConstraint> json_;
  bool cache_taken_ = false;
};

// Logits [T, V] (float32) for one prompt, prefilled in chunks: for parity checks.
mx::array prompt_logits(const Decoder& model, const std::vector<int>& tokens, int chunk = 512);

}  // namespace mlxr
