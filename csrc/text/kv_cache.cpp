#include "text/kv_cache.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "nn/slicing.h"

namespace mlxr {

namespace {

// Positions [begin, end) of a [B, H, L, D] buffer.
mx::array positions(const mx::array& buffer, int begin, int end) {
  return axis_slice(buffer, 2, begin, end);
}

// A buffer [batch, heads, capacity, dim] of `dtype` holding `old`'s first `keep` positions.
mx::array grown(const std::optional<mx::array>& old, int keep, int batch, int heads, int dim, mx::Dtype dtype,
                int capacity) {
  auto buffer = mx::zeros({batch, heads, capacity, dim}, dtype);
  if (old && keep > 0) {
    buffer =
        mx::slice_update(buffer, positions(*old, 0, keep), mx::Shape{0, 0, 0, 0}, mx::Shape{batch, heads, keep, dim});
  }
  return buffer;
}

// The same with like's batch, heads, dim and dtype.
mx::array grown(const std::optional<mx::array>& old, int keep, const mx::array& like, int capacity) {
  return grown(old, keep, like.shape(0), like.shape(1), like.shape(3), like.dtype(), capacity);
}

int whole_steps(int needed) {
  return ((needed + KVCache::kStep - 1) / KVCache::kStep) * KVCache::kStep;
}

// Room for `slots` positions: whole kSteps, and never more than a sliding window's W (window 0: no bound).
int capacity_for(int slots, int window) {
  return window > 0 ? std::min(whole_steps(slots), window) : whole_steps(slots);
}

mx::array written(const mx::array& buffer, const mx::array& part, int at) {
  return mx::slice_update(buffer, part, mx::Shape{0, 0, at, 0},
                          mx::Shape{part.shape(0), part.shape(1), at + part.shape(2), part.shape(3)});
}

// The held positions oldest first: the buffer as it is unless decoding has rotated it.
mx::array in_temporal_order(const mx::array& buffer, int held, int next_slot) {
  if (next_slot == held) return positions(buffer, 0, held);
  return mx::concatenate({positions(buffer, next_slot, held), positions(buffer, 0, next_slot)}, 2);
}

}  // namespace

std::pair<mx::array, mx::array> KVCache::update_and_fetch(const mx::array& keys, const mx::array& values) {
  if (window_ == 0) return append_full(keys, values);
  return keys.shape(2) == 1 ? write_one_rotating(keys, values) : append_chunk_rotating(keys, values);
}

std::pair<mx::array, mx::array> KVCache::append_full(const mx::array& keys, const mx::array& values) {
  const int end = offset_ + keys.shape(2);
  if (!keys_ || end > keys_->shape(2)) {
    keys_ = grown(keys_, offset_, keys, whole_steps(end));
    values_ = grown(values_, offset_, values, whole_steps(end));
  }
  keys_ = written(*keys_, keys, offset_);
  values_ = written(*values_, values, offset_);
  shared_.clear();  // new arrays: MLX wrote in place only if nothing else held the old ones
  offset_ = held_ = end;
  return {positions(*keys_, 0, end), positions(*values_, 0, end)};
}

std::pair<mx::array, mx::array> KVCache::reserve(int count, const mx::array& like) {
  return reserve(count, like.shape(1), like.shape(3), like.dtype());
}

std::pair<mx::array, mx::array> KVCache::reserve(int count, int heads, int dim, mx::Dtype dtype) {
  if (!writes_in_place()) throw std::logic_error("this cache may not be written in place");
  const int end = offset_ + count;
  if (!keys_ || end > keys_->shape(2)) {
    keys_ = grown(keys_, offset_, 1, heads, dim, dtype, whole_steps(end));
    values_ = grown(values_, offset_, 1, heads, dim, dtype, whole_steps(end));
  }
  offset_ = held_ = end;
  return {*keys_, *values_};
}

std::pair<mx::array, mx::array> KVCache::append_buffers(const mx::array& keys, const mx::array& values) {
  if (window_ != 0) throw std::logic_error("a rotating cache's buffers are not in position order");
  append_full(keys, values);
  return {*keys_, *values_};
}

// Several positions at once (a prefill chunk): the last W - 1 held positions, which the chunk's first
// queries still see, then the chunk, in temporal order.
std::pair<mx::array, mx::array> KVCache::append_chunk_rotating(const mx::array& keys, const mx::array& values) {
  const int keep = std::min(held_, window_ - 1);
  if (keys_ && keep > 0) {
    auto old_keys = in_temporal_order(*keys_, held_, next_slot_);
    auto old_values = in_temporal_order(*values_, held_, next_slot_);
    keys_ = mx::concatenate({positions(old_keys, held_ - keep, held_), keys}, 2);
    values_ = mx::concatenate({positions(old_values, held_ - keep, held_), values}, 2);
  } else {
    keys_ = keys;
    values_ = values;
  }
  held_ = next_slot_ = keep + keys.shape(2);
  offset_ += keys.shape(2);
  return {*keys_, *values_};
}

// One position (decoding): written into a buffer of at most W slots, over the oldest once it is full.
std::pair<mx::array, mx::array> KVCache::write_one_rotating(const mx::array& keys, const mx::array& values) {
  const bool in_order = next_slot_ == held_;
  if (!keys_) {
    keys_ = grown(std::nullopt, 0, keys, capacity_for(1, window_));
    values_ = grown(std::nullopt, 0, values, capacity_for(1, window_));
  } else if (in_order && held_ > window_) {  // after a chunk: only the last W can still be seen
    keys_ = positions(*keys_, held_ - window_, held_);
    values_ = positions(*values_, held_ - window_, held_);
    held_ = next_slot_ = window_;
  } else if (in_order && held_ < window_ && held_ == keys_->shape(2)) {
    keys_ = grown(keys_, held_, keys, capacity_for(held_ + 1, window_));
    values_ = grown(values_, held_, values, capacity_for(held_ + 1, window_));
  }
  if (next_slot_ == window_) next_slot_ = 0;  // full: the oldest position's slot
  keys_ = written(*keys_, keys, next_slot_);
  values_ = written(*values_, values, next_slot_);
  if (next_slot_ == held_) ++held_;
  ++next_slot_;
  ++offset_;
  if (held_ < keys_->shape(2)) return {positions(*keys_, 0, held_), positions(*values_, 0, held_)};
  return {*keys_, *values_};
}

std::vector<mx::array> KVCache::state() const {
  std::vector<mx::array> out;
  if (keys_) {
    out.push_back(*keys_);
    out.push_back(*values_);
  }
  return out;
}

size_t KVCache::nbytes() const {
  return keys_ ? keys_->nbytes() + values_->nbytes() : 0;
}

bool KVCache::can_trim_to(int length) const {
  return length == offset_ || (length >= 0 && length < offset_ && (window_ == 0 || held_ == offset_));
}

void KVCache::trim_to(int length) {
  if (!can_trim_to(length)) {
    throw std::invalid_argument("cannot trim a cache of " + std::to_string(offset_) + " positions (" +
                                std::to_string(held_) + " held) to " + std::to_string(length));
  }
  if (length == offset_) return;  // nothing to forget (a wrapped rotating cache keeps its slots as they are)
  offset_ = held_ = next_slot_ = length;
}

bool KVCache::can_trim(int n) const {
  return n >= 0 && can_trim_to(offset_ - n);
}

bool KVCache::trim(int n) {
  if (!can_trim(n)) return false;
  trim_to(offset_ - n);
  return true;
}

KVCache KVCache::holding(const mx::array& keys, const mx::array& values) {
  const int length = keys.shape(2);
  return rotating_holding(keys, values, 0, length, length);
}

KVCache KVCache::rotating_holding(const mx::array& keys, const mx::array& values, int window, int offset,
                                  int next_slot) {
  KVCache cache(window);
  const int held = keys.shape(2);
  if (held == 0) return cache;
  const int capacity = capacity_for(held, window);
  // Written into fresh buffers: a slice would keep the whole array it was cut from alive.
  cache.keys_ = written(grown(std::nullopt, 0, keys, capacity), keys, 0);
  cache.values_ = written(grown(std::nullopt, 0, values, capacity), values, 0);
  cache.offset_ = offset;
  cache.held_ = held;
  cache.next_slot_ = next_slot;
  return cache;
}

namespace {

// `buffer` [B, H, L, D] with L made `capacity`: cut, or padded with zeros.
mx::array with_capacity(const mx::array& buffer, int capacity) {
  const int now = buffer.shape(2);
  if (now == capacity) return buffer;
  if (now > capacity) return positions(buffer, 0, capacity);
  auto pad = mx::zeros({buffer.shape(0), buffer.shape(1), capacity - now, buffer.shape(3)}, buffer.dtype());
  return mx::concatenate({buffer, pad}, 2);
}

}  // namespace

void BatchKVCache::resize(int capacity) {
  keys_ = with_capacity(*keys_, capacity);
  values_ = with_capacity(*values_, capacity);
}

Rotation BatchKVCache::joining_rotation(const KVCache& cache) const {
  if (cache.held() > window_) return {.held = window_, .next_slot = window_};
  return {.held = cache.held(), .next_slot = cache.next_slot()};
}

void BatchKVCache::regroup(const std::vector<int>& kept, const std::vector<const KVCache*>& joining, int longest) {
  rows_ = static_cast<int>(kept.size() + joining.size());
  const int capacity = capacity_for(longest + 1, window_);
  // One buffer (keys: 0, values: 1) of the new rows: the kept rows (taken only when some left), then each joining
  // row's buffer; rows that hold no positions yet are zeros. Unset while no row has shown the shape.
  auto regrouped = [&](const std::optional<mx::array>& buffer, int which) -> std::optional<mx::array> {
    std::optional<mx::array> like = buffer;
    for (const KVCache* row : joining) {
      if (!like && row->offset() > 0) like = row->state()[which];
    }
    if (!like || rows_ == 0) return std::nullopt;
    auto zero_rows = [&](int n) { return mx::zeros({n, like->shape(1), capacity, like->shape(3)}, like->dtype()); };
    std::vector<mx::array> parts;
    if (!kept.empty() && !buffer) parts.push_back(zero_rows(static_cast<int>(kept.size())));
    if (!kept.empty() && buffer) {
      bool all = static_cast<int>(kept.size()) == buffer->shape(0);
      for (int i = 0; all && i < static_cast<int>(kept.size()); ++i) all = kept[i] == i;
      auto rows =
          all ? *buffer : mx::take(*buffer, mx::array(kept.data(), {static_cast<int>(kept.size())}, mx::int32), 0);
      parts.push_back(with_capacity(rows, capacity));
    }
    // A joining row's whole buffer, cut or padded only where its capacity is not the batch's: its slots past its
    // positions (zeros, or what a trim left) stay out of its attention, as the batch's padding does. (Cutting each
    // row to its positions first cost three operations a row and a buffer: ~13,000 for 61 rows of a 36-layer model.)
    for (const KVCache* row : joining) {
      if (row->offset() == 0) {
        parts.push_back(zero_rows(1));
        continue;
      }
      auto slots = row->state()[which];
      if (window_ > 0) {  // the slots it continues with (joining_rotation): its last W after a chunk
        const int kept_slots = joining_rotation(*row).held;
        if (kept_slots < row->held()) slots = positions(slots, row->held() - kept_slots, row->held());
      }
      parts.push_back(with_capacity(slots, capacity));
    }
    return parts.size() == 1 ? parts[0] : mx::concatenate(parts, 0);
  };
  keys_ = regrouped(keys_, 0);
  values_ = regrouped(values_, 1);
}

std::pair<mx::array, mx::array> BatchKVCache::update_and_fetch(const mx::array& keys, const mx::array& values,
                                                               const mx::array& slots, int visible) {
  if (keys.shape(0) != rows_) {
    throw std::invalid_argument("batch cache of " + std::to_string(rows_) + " rows got keys for " +
                                std::to_string(keys.shape(0)));
  }
  if (!keys_) {
    keys_ = mx::zeros({rows_, keys.shape(1), capacity_for(visible, window_), keys.shape(3)}, keys.dtype());
    values_ = mx::zeros({rows_, values.shape(1), capacity_for(visible, window_), values.shape(3)}, values.dtype());
  } else if (visible > keys_->shape(2)) {
    resize(capacity_for(visible, window_));
  }
  auto at = mx::broadcast_to(mx::reshape(slots, {rows_, 1, 1, 1}), keys.shape());
  keys_ = mx::put_along_axis(*keys_, at, keys, 2);
  values_ = mx::put_along_axis(*values_, at, values, 2);
  return {positions(*keys_, 0, visible), positions(*values_, 0, visible)};
}

KVCache BatchKVCache::row(int index, int length, const Rotation& rotation) const {
  const int held = window_ > 0 ? rotation.held : length;
  if (!keys_ || held == 0) return KVCache(window_);
  auto cut = [&](const mx::array& buffer) {
    return mx::slice(buffer, mx::Shape{index, 0, 0, 0}, mx::Shape{index + 1, buffer.shape(1), held, buffer.shape(3)});
  };
  if (window_ > 0) return KVCache::rotating_holding(cut(*keys_), cut(*values_), window_, length, rotation.next_slot);
  return KVCache::holding(cut(*keys_), cut(*values_));
}

std::vector<mx::array> BatchKVCache::state() const {
  if (!keys_) return {};
  return {*keys_, *values_};
}

bool SequenceCache::can_trim(int n) const {
  return std::all_of(layers.begin(), layers.end(), [n](const KVCache& layer) { return layer.can_trim(n); });
}

bool SequenceCache::trim(int n) {
  // Checked first, then trimmed in place: trimming a copy and keeping it would mark every layer shared.
  if (!can_trim(n)) return false;
  for (auto& layer : layers) layer.trim(n);
  return true;
}

bool SequenceCache::writes_in_place() const {
  return std::all_of(layers.begin(), layers.end(), [](const KVCache& layer) { return layer.writes_in_place(); });
}

size_t SequenceCache::nbytes() const {
  size_t total = 0;
  for (const auto& layer : layers) total += layer.nbytes();
  return total;
}

}  // namespace mlxr
