#include "text/generate.h"

#include <algorithm>
#include <numeric>
#include <span>
#include <stdexcept>

#include "nn/cuda_host_ints.h"

namespace mlxr {

namespace {

// tokens[begin, end) as [1, end - begin]; on CUDA, under MLXRUNNER_HOST_INTS_BY_KERNEL=1, written by a kernel instead
// of read from managed memory by the GPU (nn/cuda_host_ints.h).
mx::array as_batch(const std::vector<int>& tokens, size_t begin, size_t end) {
  const std::span<const int> batch(tokens.data() + begin, end - begin);
  if (host_ints_by_kernel_switched_on()) {
    if (auto on_device = cuda_int32_from_host(batch)) return *on_device;
  }
  return mx::array(batch.data(), {1, static_cast<int>(batch.size())}, mx::int32);
}

void eval_cache(const std::vector<KVCache>& cache) {
  std::vector<mx::array> state;
  for (const auto& layer : cache) {
    for (auto& a : layer.state()) state.push_back(a);
  }
  mx::eval(state);
}

}  // namespace

Generator::Generator(const Decoder& model, const std::vector<int>& prompt, const SamplerOptions& options,
                     int prefill_chunk, int top_logprobs, std::optional<SequenceCache>&& start, int max_tokens,
                     const TokenVocabulary* json, const JsonSchema* json_schema, std::optional<mx::array> logit_bias)
    : model_(model),
      prompt_(prompt),
      cache_(start ? std::vector<KVCache>{} : model.make_cache()),
      sampler_(options, model.config().vocab_size),
      prefill_chunk_(prefill_chunk),
      top_logprobs_(top_logprobs),
      max_tokens_(max_tokens) {
  if (prompt_.empty()) throw std::invalid_argument("the prompt has no tokens");
  if (prefill_chunk_ <= 0) throw std::invalid_argument("prefill_chunk must be positive");
  const size_t layers = start ? start->layers.size() : cache_.size();
  if (static_cast<int>(layers) != model.config().num_hidden_layers) {
    throw std::invalid_argument("the start cache has " + std::to_string(layers) + " layers, the model " +
                                std::to_string(model.config().num_hidden_layers));
  }
  const int held = start ? start->length() : 0;
  if (held >= static_cast<int>(prompt_.size())) {
    throw std::invalid_argument("the start cache holds " + std::to_string(held) +
                                " positions; it must hold fewer than the prompt's " + std::to_string(prompt_.size()));
  }
  for (int t : prompt_) {
    if (t < 0 || t >= model.config().vocab_size) {
      throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary");
    }
  }
  if (logit_bias) sampler_.set_bias(*logit_bias);
  if (json_schema && !json) throw std::invalid_argument("a JSON schema needs the vocabulary (json)");
  if (json) json_.emplace(*json, model.config().vocab_size, json_schema ? *json_schema : JsonSchema::any_object());
  if (start) cache_ = std::move(start->layers);  // last: a refusal above leaves the caller's caches whole
}

mx::array Generator::step(const mx::array& token) {
  return model_.forward(mx::reshape(token, {1, 1}), cache_);
}

void Generator::sample(const mx::array& logits) {
  auto flat = mx::reshape(logits, {-1});
  pending_ = sampler_.sample(flat);
  if (top_logprobs_ < 0) {
    mx::async_eval({*pending_});
    return;
  }
  pending_logprobs_ = PendingLogprobs::of(flat, *pending_, top_logprobs_);
  auto arrays = pending_logprobs_->arrays();
  arrays.push_back(*pending_);
  mx::async_eval(arrays);
}

PendingLogprobs PendingLogprobs::of(const mx::array& logits, const mx::array& token, int k) {
  // All lazy, evaluated with the token: reading them back then waits for nothing more.
  auto z = mx::astype(logits, mx::float32);
  auto logprobs = mx::subtract(z, mx::logsumexp(z));
  k = std::min(k, static_cast<int>(logprobs.size()));
  // The k best in any order (a partition, not a sort of the vocabulary); sorted on the host.
  auto ids = k > 0 ? mx::slice(mx::argpartition(mx::negative(logprobs), k - 1), {0}, {k}) : mx::array({}, mx::uint32);
  return PendingLogprobs{mx::take(logprobs, token), ids, mx::take(logprobs, ids)};
}

TokenLogprobs PendingLogprobs::read() const {
  TokenLogprobs out;
  out.logprob = chosen.item<float>();
  const int k = static_cast<int>(top_ids.size());
  if (k == 0) return out;
  mx::eval({top_ids, top_values});
  const auto* ids = top_ids.data<uint32_t>();
  const auto* values = top_values.data<float>();
  std::vector<int> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return values[a] > values[b]; });
  for (int i : order) {
    out.top_ids.push_back(static_cast<int>(ids[i]));
    out.top_logprobs.push_back(values[i]);
  }
  return out;
}

int Generator::prefill_chunk() {
  // All but the last prompt token fill the cache in chunks; evaluating each chunk bounds the graph and the
  // memory. The chunk's temporaries stay in MLX's buffer cache, where the next chunk and the decode steps take
  // them again (the runner gives the cache back once it is idle, cli/serve.py). Clearing it here, as mlx-lm
  // does, makes every later buffer of the request a fresh allocation, which costs on CUDA (the image pipeline
  // measured it, benchmarks/README.md "The cache"); with it, a 64-token prompt took ~31 ms on an H200 where a
  // decode step is ~6 ms (not yet re-measured without).
  const int last = static_cast<int>(prompt_.size()) - 1;
  const int done = position();
  if (done < last) {
    const int end = std::min(last, done + prefill_chunk_);
    model_.forward(as_batch(prompt_, done, end), cache_);
    eval_cache(cache_);
  }
  return last - position();
}

mx::array Generator::first_logits() {
  while (prompt_left() > prefill_chunk_) prefill_chunk();
  sampler_.remember(prompt_);
  // The rest of the prompt and its last token in one forward: a separate one-row forward for the last token cost a
  // whole pass of the model's operations (on a GPU ~5 ms of host time at 4B), a third of a cached prompt's
  // follow-up.
  return model_.forward(as_batch(prompt_, position(), prompt_.size()), cache_, /*last_only=*/true);
}

int Generator::next() {
  if (cache_taken_) throw std::logic_error("the generator's cache was taken: it is finished");
  if (exhausted()) throw std::logic_error("the generator has returned its max_tokens tokens");
  if (json_) return next_json();
  if (returned_ == 0) sample(first_logits());
  auto current = *pending_;
  auto current_logprobs = pending_logprobs_;
  ++returned_;
  if (max_tokens_ < 0 || returned_ < max_tokens_) {
    sample(step(current));  // dispatch n+1 before reading n
  }
  // A direct read, as mlx-lm's loop does: MLX 0.32's item() waits for the token and reads it
  // through Buffer::raw_ptr, which moves a CUDA buffer to host-visible memory itself. Routing it
  // through a CPU-stream copy (nn/host.h) cost 1.7 ms per token on an H100 at 4B/8B: the wait
  // then also covered the next token's dispatched work, and the loop lost its one-token overlap.
  last_token_ = current.item<int>();
  if (current_logprobs) logprobs_ = current_logprobs->read();
  return last_token_;
}

// A step held to JSON. The token to return was drawn, without the mask, when the previous step was dispatched
// (pending_, from pending_logits_). While its check waits for the device, the step after it is dispatched on the
// guess that the check passes, as a capable model's draws nearly always do: the loop then keeps the plain loop's
// one-step overlap. A refused draw takes that step back (the caches forget its position, the sampler its token)
// and draws again from the masked logits. A guess costs a whole step when it fails, so the generator guesses only
// while few recent draws were refused (a moving share, kJsonGuessBelow).
int Generator::next_json() {
  if (json_->complete()) throw std::logic_error("the generator has written its whole JSON object");
  if (returned_ == 0) draw_json(mx::reshape(first_logits(), {-1}));
  const auto logits = *pending_logits_;
  auto token = *pending_;
  const bool more = max_tokens_ < 0 || returned_ + 1 < max_tokens_;
  const int before = position();
  auto history = sampler_.history();
  sampler_.remember(token);
  bool ahead = more && speculates_json() && json_refusals_ < kJsonGuessBelow;
  if (ahead) draw_json(mx::reshape(step(token), {-1}));
  int id = token.item<int>();
  const bool refused = !json_->take(id);
  json_refusals_ = 0.75f * json_refusals_ + 0.25f * (refused ? 1.0f : 0.0f);
  if (refused) {
    if (ahead) {
      for (auto& layer : cache_) layer.trim_to(before);
      ahead = false;
    }
    sampler_.restore_history(std::move(history));
    token = sampler_.choose(logits, json_->mask());
    id = token.item<int>();
    if (!json_->take(id)) throw std::runtime_error("no token of the vocabulary can continue the JSON here");
    sampler_.remember(token);
  }
  if (top_logprobs_ >= 0) logprobs_ = PendingLogprobs::of(logits, token, top_logprobs_).read();
  ++returned_;
  last_token_ = id;
  if (!ahead && more && !json_->complete()) draw_json(mx::reshape(step(token), {-1}));
  return id;
}

void Generator::draw_json(const mx::array& logits) {
  pending_logits_ = logits;
  pending_ = sampler_.choose(logits);
  mx::async_eval({*pending_});
}

// Guessing ahead needs caches that can forget their last position: full ones (a rotating cache that has evicted
// a position cannot), so a model with sliding-window layers checks each token before the next step.
bool Generator::speculates_json() const {
  return std::all_of(cache_.begin(), cache_.end(), [](const KVCache& layer) { return layer.window() == 0; });
}

Generator::Started Generator::hand_off() {
  if (returned_ == 0 || !exhausted()) {
    throw std::logic_error("a generator is handed off after next() has returned its max_tokens tokens");
  }
  auto cache = take_cache();
  return Started{std::move(cache), std::move(sampler_), last_token_};
}

SequenceCache Generator::take_cache() {
  if (cache_taken_) throw std::logic_error("the generator's cache was already taken");
  cache_taken_ = true;
  pending_.reset();
  pending_logprobs_.reset();
  pending_logits_.reset();
  return SequenceCache{std::move(cache_)};
}

mx::array prompt_logits(const Decoder& model, const std::vector<int>& tokens, int chunk) {
  auto cache = model.make_cache();
  std::vector<mx::array> parts;
  for (size_t begin = 0; begin < tokens.size(); begin += chunk) {
    const size_t end = std::min(tokens.size(), begin + static_cast<size_t>(chunk));
    auto logits = mx::astype(mx::squeeze(model.forward(as_batch(tokens, begin, end), cache), 0), mx::float32);
    mx::eval(logits);
    parts.push_back(logits);
  }
  return mx::concatenate(parts, 0);
}

}  // namespace mlxr
