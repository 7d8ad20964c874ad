#include "text/batch.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace mlxr {

BatchGenerator::BatchGenerator(const Decoder& model) : model_(model) {
  if (!model.can_batch()) {
    throw std::invalid_argument("this model has latent attention or attention-sink layers, which do not batch");
  }
  for (int i = 0; i < model.config().num_hidden_layers; ++i) {
    cache_.emplace_back(model.config().window(i));
    if (cache_.back().window() > 0 && window_layer_ < 0) window_layer_ = i;
  }
}

int BatchGenerator::add(const std::vector<int>& prompt, const SamplerOptions& options, int top_logprobs,
                        SequenceCache cache) {
  if (prompt.empty()) throw std::invalid_argument("the prompt has no tokens");
  if (cache.layers.size() != cache_.size()) {
    throw std::invalid_argument("the cache has " + std::to_string(cache.layers.size()) + " layers, the model " +
                                std::to_string(cache_.size()));
  }
  if (cache.length() != static_cast<int>(prompt.size()) - 1) {
    throw std::invalid_argument("the cache holds " + std::to_string(cache.length()) +
                                " positions; a row joins with all of its prompt but the last token (" +
                                std::to_string(prompt.size() - 1) + ")");
  }
  for (int t : prompt) {
    if (t < 0 || t >= model_.config().vocab_size) {
      throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary");
    }
  }
  Sampler sampler(options, model_.config().vocab_size);
  sampler.remember(prompt);
  return push_row(std::move(cache), prompt.back(), std::move(sampler), top_logprobs);
}

int BatchGenerator::join(Generator& generator) {
  if (&generator.model() != &model_) throw std::invalid_argument("the generator's model is not the batch's");
  const int top_logprobs = generator.top_logprobs();
  auto started = generator.hand_off();
  return push_row(std::move(started.cache), started.next_input, std::move(started.sampler), top_logprobs);
}

int BatchGenerator::push_row(SequenceCache cache, int next_input, Sampler sampler, int top_logprobs) {
  const bool plain = sampler.greedy() && !sampler.uses_penalties() && !sampler.biased() && top_logprobs < 0;
  Rotation rotation;
  if (window_layer_ >= 0) rotation = cache_[window_layer_].joining_rotation(cache.layers[window_layer_]);
  rows_.push_back(Row{.id = next_id_,
                      .length = cache.length(),
                      .next_input = next_input,
                      .sampler = std::move(sampler),
                      .plain_greedy = plain,
                      .top_logprobs = top_logprobs,
                      .rotation = rotation,
                      .joining = std::move(cache)});
  return next_id_++;
}

// The rows that joined or left since the last step change the buffers here, one copy of each layer's buffers for all
// of them. Joined and left one at a time, 60 requests arriving (or finishing) together copied the whole batch 60
// times, and MLX's buffer cache kept a buffer of every batch size on the way (it reuses a buffer for a request of
// nearly its size only): on an H100 80GB, 64 streams of a 4B model passed through buffers of ~75 GB in all, and
// every step after such a burst took 0.75 s instead of 10 ms, as if reading the weights (managed memory) over PCIe
// (benchmarks/README.md, session 34).
void BatchGenerator::regroup() {
  std::vector<int> kept;
  std::vector<const SequenceCache*> joining;
  int longest = 0, most_held = 0;
  for (const Row& row : rows_) {
    longest = std::max(longest, row.length);
    most_held = std::max(most_held, row.rotation.held);
    if (row.joining) {
      joining.push_back(&*row.joining);
    } else {
      kept.push_back(row.slot);
    }
  }
  if (joining.empty() && static_cast<int>(kept.size()) == buffered_) return;  // no row joined or left
  for (size_t i = 0; i < cache_.size(); ++i) {
    std::vector<const KVCache*> layer;
    for (const SequenceCache* cache : joining) layer.push_back(&cache->layers[i]);
    cache_[i].regroup(kept, layer, cache_[i].window() > 0 ? most_held : longest);
  }
  for (int i = 0; i < size(); ++i) {
    rows_[i].slot = i;
    rows_[i].joining.reset();
  }
  buffered_ = size();
}

mx::array BatchGenerator::sample(const mx::array& logits) {
  const int b = logits.shape(0);
  auto best = greedy_tokens(logits);
  if (std::all_of(rows_.begin(), rows_.end(), [](const Row& r) { return r.plain_greedy; })) return best;
  std::vector<mx::array> tokens;
  for (int i = 0; i < b; ++i) {
    Row& row = rows_[i];
    if (row.plain_greedy) {
      tokens.push_back(mx::slice(best, mx::Shape{i}, mx::Shape{i + 1}));
      continue;
    }
    auto row_logits = mx::reshape(mx::slice(logits, mx::Shape{i, 0}, mx::Shape{i + 1, logits.shape(1)}), {-1});
    auto token = row.sampler.sample(row_logits);
    if (row.top_logprobs >= 0) row.pending_logprobs = PendingLogprobs::of(row_logits, token, row.top_logprobs);
    tokens.push_back(mx::reshape(token, {1}));
  }
  return mx::concatenate(tokens, 0);
}

// The step's positions as the array every layer's kernels read (RoPE, the cache writes, attention). When the rows are
// the last step's, each one further, it is the last step's array + 1, made on the device: an array made from host
// data is unified memory on CUDA, whose pages the GPU faults in at the step's first read, and the host writes the next
// step's back (the prompt cache's profile, benchmarks/README.md session 22). Rows joining or leaving make it afresh.
mx::array BatchGenerator::positions_array(const std::vector<int>& positions) {
  bool each_one_further = last_positions_array_ && last_positions_.size() == positions.size();
  for (size_t i = 0; each_one_further && i < positions.size(); ++i) {
    each_one_further = positions[i] == last_positions_[i] + 1;
  }
  last_positions_array_ = each_one_further
                              ? mx::add(*last_positions_array_, mx::array(1, mx::int32))
                              : mx::array(positions.data(), {static_cast<int>(positions.size())}, mx::int32);
  last_positions_ = positions;
  return *last_positions_array_;
}

std::vector<std::pair<int, int>> BatchGenerator::step() {
  if (rows_.empty()) return {};
  regroup();
  const int b = size();
  // The tokens this step feeds: each computed row's pending token, then the new rows' first inputs.
  std::vector<int> positions, prompt_tokens;
  int computed = 0;
  for (const Row& row : rows_) {
    positions.push_back(row.length);
    if (row.computed) {
      ++computed;
    } else {
      prompt_tokens.push_back(row.next_input);
    }
  }
  std::vector<mx::array> parts;
  if (computed > 0) parts.push_back(*pending_);
  if (!prompt_tokens.empty()) {
    parts.push_back(mx::array(prompt_tokens.data(), {static_cast<int>(prompt_tokens.size())}, mx::int32));
  }
  auto fed = parts.size() == 1 ? parts[0] : mx::concatenate(parts, 0);
  // Row b's new token goes to position positions[b] and sees its keys 0..positions[b]. Rows of one length
  // (a lone row, say) see every key: no mask, and attention takes the kernel a lone run takes (on CUDA, MLX's
  // masked attention is not its fused one-query kernel).
  const auto [shortest, longest] = std::minmax_element(positions.begin(), positions.end());
  const int visible = *longest + 1;
  auto at = positions_array(positions);
  std::optional<mx::array> mask;
  if (*shortest != *longest) {
    mask = mx::reshape(mx::less_equal(mx::arange(visible, mx::int32), mx::reshape(at, {b, 1})), {b, 1, 1, visible});
  }
  std::optional<Decoder::WindowStep> window;
  if (window_layer_ >= 0) window = window_step();
  auto logits = model_.forward_batch(mx::reshape(fed, {b, 1}), at, visible, mask, cache_, window);
  // The logprobs of the tokens fed now (computed by the last step), read once this step is dispatched.
  std::vector<std::optional<PendingLogprobs>> fed_logprobs;
  for (Row& row : rows_) fed_logprobs.push_back(std::exchange(row.pending_logprobs, std::nullopt));
  pending_ = sample(mx::reshape(logits, {b, logits.shape(2)}));
  std::vector<mx::array> dispatch{*pending_};
  for (const Row& row : rows_) {
    if (row.pending_logprobs) {
      for (auto& a : row.pending_logprobs->arrays()) dispatch.push_back(a);
    }
  }
  mx::async_eval(dispatch);
  mx::eval(fed);
  const auto* ids = fed.data<int32_t>();
  std::vector<std::pair<int, int>> out;
  for (int i = 0; i < b; ++i) {
    Row& row = rows_[i];
    ++row.length;
    if (row.computed) {
      out.emplace_back(row.id, ids[i]);
      if (fed_logprobs[i]) row.logprobs = fed_logprobs[i]->read();
    }
    row.computed = true;
  }
  return out;
}

// Each row's new position goes where its rotating caches would put it alone (KVCache::write_one_rotating): the next
// slot, back to 0 once all W are in use, and the row then sees the slots it holds.
Decoder::WindowStep BatchGenerator::window_step() {
  std::vector<int> slots, last_slots;
  const int w = cache_[window_layer_].window();
  int most = 0, fewest = w;
  for (Row& row : rows_) {
    const int slot = row.rotation.next_slot == w ? 0 : row.rotation.next_slot;
    if (slot == row.rotation.held) ++row.rotation.held;
    row.rotation.next_slot = slot + 1;
    slots.push_back(slot);
    last_slots.push_back(row.rotation.held - 1);
    most = std::max(most, row.rotation.held);
    fewest = std::min(fewest, row.rotation.held);
  }
  const int b = size();
  auto last = mx::array(last_slots.data(), {b}, mx::int32);
  std::optional<mx::array> mask;
  if (fewest != most) {
    mask = mx::reshape(mx::less_equal(mx::arange(most, mx::int32), mx::reshape(last, {b, 1})), {b, 1, 1, most});
  }
  return {.slots = mx::array(slots.data(), {b}, mx::int32), .last_slots = last, .visible = most, .mask = mask};
}

SequenceCache BatchGenerator::remove(int id) {
  const int index = index_of(id);
  Row& leaving = rows_[index];
  SequenceCache taken;
  if (leaving.joining) {  // it never reached the buffers: its caches as they came
    taken = std::move(*leaving.joining);
  } else {
    for (auto& layer : cache_) taken.layers.push_back(layer.row(leaving.slot, leaving.length, leaving.rotation));
    std::vector<mx::array> state;
    for (const auto& layer : taken.layers) {
      for (auto& a : layer.state()) state.push_back(a);
    }
    mx::async_eval(state);  // copied out in the stream's order; the buffers it reads go at the next regroup
  }
  std::vector<int> keep;
  int computed = 0;
  for (int i = 0; i < size(); ++i) {
    if (i == index) continue;
    keep.push_back(i);
    computed += rows_[i].computed ? 1 : 0;
  }
  if (leaving.computed && computed > 0) {
    // The computed rows are a prefix of the batch: their kept indices are the first `computed`.
    pending_ = mx::take(*pending_, mx::array(keep.data(), {computed}, mx::int32), 0);
  } else if (computed == 0) {
    pending_.reset();
  }
  rows_.erase(rows_.begin() + index);
  if (rows_.empty()) regroup();  // the last row left: the buffers go now, not at a next step that may not come
  return taken;
}

int BatchGenerator::index_of(int id) const {
  for (int i = 0; i < size(); ++i) {
    if (rows_[i].id == id) return i;
  }
  throw std::invalid_argument("no row " + std::to_string(id) + " in the batch");
}

const BatchGenerator::Row& BatchGenerator::find(int id) const {
  return rows_[index_of(id)];
}

}  // namespace mlxr
