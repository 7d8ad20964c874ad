// Key/value cache for one attention layer, grown in steps so decoding does not reallocate per token.
//
// What the prompt cache (llm/prompt_cache.py) needs of a layer's cache, and so what every kind of
// layer cache implements: offset() (positions held), trim(n) (forget the last n, or say it cannot),
// nbytes() (memory held), and copies that are independent of each other. KVCache's copies are: its
// arrays are immutable and every update makes new ones (MLX writes in place only into a buffer
// nothing else holds, so a copy kept by the prompt cache is never overwritten by a running request).
#pragma once

#include <cstddef>
#include <utility>

#include "nn/weights.h"

namespace mlxr {

class KVCache {
 public:
  static constexpr int kStep = 256;

  // Append keys/values [B, H_kv, T, D] at the current offset; return all cached [.., offset+T, ..].
  std::pair<mx::array, mx::array> update_and_fetch(const mx::array& keys, const mx::array& values);

  int offset() const { return offset_; }
  // Forget the last n positions (the next update overwrites them); false, and unchanged, if n is not in
  // 0..offset. (A cache that no longer holds every position, a sliding window that has wrapped, returns
  // false for any n > 0.)
  bool trim(int n);
  // Bytes held by the buffers, their unused room included.
  size_t nbytes() const;
  // Arrays to evaluate between prefill chunks (so the lazy graph does not grow).
  std::vector<mx::array> state() const;

 private:
  std::optional<mx::array> keys_, values_;
  int offset_ = 0;
};

// One sequence's caches, a layer each: what the prompt cache keeps, and what a Generator resumes from.
// Copies are cheap (array handles) and independent.
struct SequenceCache {
  std::vector<KVCache> layers;

  // Positions held (every layer holds as many).
  int length() const { return layers.empty() ? 0 : layers[0].offset(); }
  // Forget the last n positions in every layer, or in none (false) if one of them cannot.
  bool trim(int n);
  size_t nbytes() const;
};

}  // namespace mlxr
