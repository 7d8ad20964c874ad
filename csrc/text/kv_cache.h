// Key/value cache for one attention layer, grown in steps so decoding does not reallocate per token.
#pragma once

#include <utility>

#include "nn/weights.h"

namespace mlxr {

class KVCache {
 public:
  static constexpr int kStep = 256;

  // Append keys/values [B, H_kv, T, D] at the current offset; return all cached [.., offset+T, ..].
  std::pair<mx::array, mx::array> update_and_fetch(const mx::array& keys, const mx::array& values);

  int offset() const { return offset_; }
  // Arrays to evaluate between prefill chunks (so the lazy graph does not grow).
  std::vector<mx::array> state() const;

 private:
  std::optional<mx::array> keys_, values_;
  int offset_ = 0;
};

}  // namespace mlxr
