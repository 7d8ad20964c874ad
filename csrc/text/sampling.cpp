#include "text/sampling.h"

#include <stdexcept>

#include "nn/cuda_argmax.h"

namespace mlxr {

uint64_t splitmix64(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (counter + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

Sampler::Sampler(const SamplerOptions& options, int vocab_size) : options_(options), vocab_size_(vocab_size) {
  // Ollama's normalisation at registration.
  if (options_.repeat_penalty <= 0.0f) options_.repeat_penalty = 1.0f;
  if (options_.top_k >= vocab_size_) options_.top_k = 0;
}

bool Sampler::uses_penalties() const {
  return options_.repeat_last_n != 0 &&
         (options_.repeat_penalty != 1.0f || options_.presence_penalty != 0.0f || options_.frequency_penalty != 0.0f);
}

void Sampler::remember(const std::vector<int>& tokens) {
  if (!uses_penalties() || tokens.empty()) return;
  remember(mx::array(tokens.data(), {static_cast<int>(tokens.size())}, mx::int32));
}

void Sampler::remember(const mx::array& tokens) {
  if (!uses_penalties()) return;
  auto flat = mx::astype(mx::flatten(tokens), mx::int32);
  auto all = history_ ? mx::concatenate({*history_, flat}) : flat;
  const int n = all.shape(0), keep = options_.repeat_last_n;
  history_ = (keep > 0 && n > keep) ? mx::slice(all, {n - keep}, {n}) : all;
}

mx::array Sampler::penalized(const mx::array& logits) const {
  if (!uses_penalties() || !history_ || history_->shape(0) == 0) return logits;
  auto z = mx::astype(logits, mx::float32);
  const auto& h = *history_;
  if (options_.repeat_penalty != 1.0f || options_.presence_penalty != 0.0f) {
    auto seen = mx::take(z, h, 0);
    if (options_.repeat_penalty != 1.0f) {
      auto rp = mx::array(options_.repeat_penalty);
      seen = mx::where(mx::less(seen, mx::array(0.0f)), mx::multiply(seen, rp), mx::divide(seen, rp));
    }
    if (options_.presence_penalty != 0.0f) {
      seen = mx::subtract(seen, mx::array(options_.presence_penalty));
    }
    // Duplicates in the history write the same value: the effect is once per distinct token.
    z = mx::put_along_axis(z, h, seen, 0);
  }
  if (options_.frequency_penalty != 0.0f) {
    auto minus = mx::full({h.shape(0)}, -options_.frequency_penalty, mx::float32);
    z = mx::scatter_add_axis(z, h, minus, 0);  // once per occurrence
  }
  return z;
}

mx::array greedy_tokens(const mx::array& z) {
  if (auto tokens = cuda_argmax(z)) return *tokens;
  return mx::astype(mx::argmax(z, -1), mx::int32);
}

mx::array Sampler::probabilities(const mx::array& logits) const {
  return distribution(penalized(logits));
}

mx::array Sampler::distribution(const mx::array& penalized_logits) const {
  auto z = mx::astype(penalized_logits, mx::float32);
  if (greedy()) {
    auto best = mx::argmax(z, 0);
    return mx::astype(mx::equal(mx::arange(vocab_size_, mx::int32), mx::astype(best, mx::int32)), mx::float32);
  }
  const float t = options_.temperature;
  auto probs = mx::softmax(mx::divide(z, mx::array(t)), std::vector<int>{0}, true);
  if (options_.top_k > 0) {
    // Keep the k best: zero everything below the k-th largest logit (ties at the edge stay).
    auto kth = mx::take(mx::sort(z, 0), mx::array(vocab_size_ - options_.top_k), 0);
    probs = mx::where(mx::greater_equal(z, kth), probs, mx::array(0.0f));
    probs = mx::divide(probs, mx::sum(probs));
  }
  if (options_.top_p > 0.0f && options_.top_p < 1.0f) {
    auto order = mx::argsort(mx::negative(probs), 0);
    auto sorted = mx::take(probs, order, 0);
    auto before = mx::subtract(mx::cumsum(sorted, 0), sorted);  // mass strictly before each token
    auto keep_sorted = mx::less(before, mx::array(options_.top_p));
    auto kept = mx::where(keep_sorted, sorted, mx::array(0.0f));
    probs = mx::put_along_axis(mx::zeros_like(probs), order, kept, 0);
  }
  if (options_.min_p > 0.0f) {
    auto floor = mx::multiply(mx::max(probs), mx::array(options_.min_p));
    probs = mx::where(mx::less(probs, floor), mx::array(0.0f), probs);
  }
  return mx::divide(probs, mx::maximum(mx::sum(probs), mx::array(1e-20f)));
}

mx::array Sampler::draw(const mx::array& probs) {
  auto logp = mx::where(mx::greater(probs, mx::array(0.0f)), mx::log(mx::maximum(probs, mx::array(1e-20f))),
                        mx::array(-std::numeric_limits<float>::infinity()));
  if (options_.seed) {
    auto key = mx::random::key(splitmix64(*options_.seed, draws_++));
    return mx::random::categorical(logp, 0, key);
  }
  return mx::random::categorical(logp, 0);
}

void Sampler::set_bias(const mx::array& bias) {
  if (bias.ndim() != 1 || bias.shape(0) != vocab_size_) {
    throw std::invalid_argument("a logit bias is [" + std::to_string(vocab_size_) + "], got " +
                                shape_string(bias.shape()));
  }
  bias_ = mx::astype(bias, mx::float32);
}

mx::array Sampler::sample(const mx::array& logits) {
  auto token = choose(logits);
  remember(token);
  return token;
}

mx::array Sampler::choose(const mx::array& logits, const std::optional<mx::array>& bias) {
  if (logits.ndim() != 1 || logits.shape(0) != vocab_size_) {
    throw std::invalid_argument("sampler expects logits [" + std::to_string(vocab_size_) + "], got " +
                                shape_string(logits.shape()));
  }
  auto z = penalized(logits);
  if (bias_) z = mx::add(mx::astype(z, mx::float32), *bias_);
  if (bias) z = mx::add(mx::astype(z, mx::float32), *bias);
  return greedy() ? greedy_tokens(z) : mx::astype(draw(distribution(z)), mx::int32);
}

}  // namespace mlxr
