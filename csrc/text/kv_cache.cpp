#include "text/kv_cache.h"

namespace mlxr {

namespace {

// A buffer with room for `needed` positions, rounded up to whole steps, holding `old`'s first `keep`.
mx::array grown(const std::optional<mx::array>& old, int keep, const mx::array& like, int needed) {
  const int capacity = ((needed + KVCache::kStep - 1) / KVCache::kStep) * KVCache::kStep;
  auto buffer = mx::zeros({like.shape(0), like.shape(1), capacity, like.shape(3)}, like.dtype());
  if (old && keep > 0) {
    auto kept = mx::slice(*old, mx::Shape{0, 0, 0, 0}, mx::Shape{like.shape(0), like.shape(1), keep, like.shape(3)});
    buffer = mx::slice_update(buffer, kept, mx::Shape{0, 0, 0, 0},
                              mx::Shape{like.shape(0), like.shape(1), keep, like.shape(3)});
  }
  return buffer;
}

}  // namespace

std::pair<mx::array, mx::array> KVCache::update_and_fetch(const mx::array& keys, const mx::array& values) {
  const int t = keys.shape(2);
  const int end = offset_ + t;
  if (!keys_ || end > keys_->shape(2)) {
    keys_ = grown(keys_, offset_, keys, end);
    values_ = grown(values_, offset_, values, end);
  }
  const int b = keys.shape(0);
  keys_ = mx::slice_update(*keys_, keys, mx::Shape{0, 0, offset_, 0}, mx::Shape{b, keys.shape(1), end, keys.shape(3)});
  values_ = mx::slice_update(*values_, values, mx::Shape{0, 0, offset_, 0},
                             mx::Shape{b, values.shape(1), end, values.shape(3)});
  offset_ = end;
  return {mx::slice(*keys_, mx::Shape{0, 0, 0, 0}, mx::Shape{b, keys.shape(1), end, keys.shape(3)}),
          mx::slice(*values_, mx::Shape{0, 0, 0, 0}, mx::Shape{b, values.shape(1), end, values.shape(3)})};
}

bool KVCache::trim(int n) {
  if (n < 0 || n > offset_) return false;
  offset_ -= n;
  return true;
}

size_t KVCache::nbytes() const { return keys_ ? keys_->nbytes() + values_->nbytes() : 0; }

std::vector<mx::array> KVCache::state() const {
  std::vector<mx::array> out;
  if (keys_) {
    out.push_back(*keys_);
    out.push_back(*values_);
  }
  return out;
}

bool SequenceCache::trim(int n) {
  auto trimmed = layers;
  for (auto& layer : trimmed) {
    if (!layer.trim(n)) return false;
  }
  layers = std::move(trimmed);
  return true;
}

size_t SequenceCache::nbytes() const {
  size_t total = 0;
  for (const auto& layer : layers) total += layer.nbytes();
  return total;
}

}  // namespace mlxr
