// Key/value cache for one attention layer, grown in steps so decoding does not reallocate per token.
//
// A layer with sliding-window attention (window W: a token sees itself and the W - 1 positions before
// it) gets a rotating cache: it keeps only the positions a later query can still see, so its memory
// stays bounded however long the text grows (mlx-lm's RotatingKVCache, Ollama's sliding-window cache).
// Decoding writes each new position over the oldest held one, so the held keys are then in rotated
// order; a lone query sees all of them and attention does not depend on the keys' order. A chunk of
// several positions is appended after the held ones in temporal order, so that a mask can tell which
// keys each query of the chunk sees (nn/attention.h's windowed_causal_attention).
//
// What the prompt cache (llm/prompt_cache.py) needs of a layer's cache, and so what every kind of layer cache
// implements: offset() (positions seen), trim(n) (forget the last n, or say it cannot), nbytes() (memory
// held), and copies that are independent of each other. Copying a cache is a snapshot: its arrays are
// immutable MLX arrays that updates replace, never modify (MLX writes in place only into a buffer nothing
// else holds, so a copy kept by the prompt cache is never overwritten by a running request). The one exception,
// the CUDA attention kernels that write new positions into the buffers themselves (reserve), is taken only while no
// copy shares them (writes_in_place).
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "nn/weights.h"

namespace mlxr {

class KVCache {
 public:
  static constexpr int kStep = 256;

  // window 0: keep every position; W > 0: a rotating cache for attention over the last W positions.
  explicit KVCache(int window = 0) : window_(window) {}

  // Append keys/values [B, H_kv, T, D] for the next T positions; return the keys/values attention
  // runs over: [.., offset+T, ..] for a full cache; for a rotating one, the held positions (at most
  // W - 1) then the T new ones, in temporal order when T > 1.
  std::pair<mx::array, mx::array> update_and_fetch(const mx::array& keys, const mx::array& values);

  // Positions seen so far (the next token's position).
  int offset() const { return offset_; }
  int window() const { return window_; }
  // Positions whose keys are held: offset() for a full cache; at most about W for a rotating one.
  int held() const { return held_; }
  // Arrays to evaluate between prefill chunks (so the lazy graph does not grow).
  std::vector<mx::array> state() const;
  // Bytes of the key and value buffers (allocated capacity, not just the held positions).
  size_t nbytes() const;

  // Whether trim_to(length) can cut the cache back to its first `length` positions. A full cache
  // always can; a rotating cache only while it has evicted nothing (offset() == held()), or to its
  // whole length: once a position has been overwritten, an earlier prefix's window is gone and that
  // prefix must be recomputed.
  bool can_trim_to(int length) const;
  // Forget every position from `length` on (0 <= length <= offset(); can_trim_to(length) must hold).
  void trim_to(int length);
  // Whether trim(n) can forget the last n positions: n in 0..offset() and can_trim_to allows it.
  bool can_trim(int n) const;
  // Forget the last n positions; false, and unchanged, if n is not in 0..offset() or the cache cannot
  // (a rotating cache that has evicted a position).
  bool trim(int n);

  // A full cache holding these keys/values [1, H, L, D] as its L positions, in a buffer of its own.
  static KVCache holding(const mx::array& keys, const mx::array& values);
  // A rotating cache (window W; 0: a full one, as holding) that has seen `offset` positions and holds these
  // keys/values [1, H, held, D] in its slot order, its next position going to slot `next_slot`, in buffers of its own.
  static KVCache rotating_holding(const mx::array& keys, const mx::array& values, int window, int offset,
                                  int next_slot);
  // The slot a rotating cache's next single position goes to (W: slot 0, once all W hold positions).
  int next_slot() const { return next_slot_; }

  // Whether a kernel may write this cache's next positions into its buffers in place (nn/cuda_decode_attention.h): a
  // full cache of which no copy has been made since its buffers were last replaced (a copy shares them: writing one
  // would change the other, where MLX's own updates leave a snapshot alone). A cache with no buffers yet may: reserve
  // makes them.
  bool writes_in_place() const { return window_ == 0 && !shared_; }
  // The buffers [1, H, capacity, D] with room for `count` more positions, which the caller's kernel writes in place
  // (writes_in_place() must hold); the cache now holds them. `like`: the new keys [1, H, count, D].
  std::pair<mx::array, mx::array> reserve(int count, const mx::array& like);
  // The same for `heads` heads of `dim` in `dtype` (a kernel that reads the new keys from a q|k|v product).
  std::pair<mx::array, mx::array> reserve(int count, int heads, int dim, mx::Dtype dtype);
  // A full cache's update_and_fetch (MLX writes the keys/values, into a copy of buffers a copy shares), returning the
  // whole buffers [1, H, capacity, D]: for a kernel that reads the cache's buffers and writes the same positions again.
  std::pair<mx::array, mx::array> append_buffers(const mx::array& keys, const mx::array& values);

 private:
  std::pair<mx::array, mx::array> append_full(const mx::array& keys, const mx::array& values);
  std::pair<mx::array, mx::array> append_chunk_rotating(const mx::array& keys, const mx::array& values);
  std::pair<mx::array, mx::array> write_one_rotating(const mx::array& keys, const mx::array& values);

  int window_;
  std::optional<mx::array> keys_, values_;
  int offset_ = 0;
  int held_ = 0;
  // Rotating cache: the buffer slot the next single position is written to (buffer order, not position).
  int next_slot_ = 0;
  // Whether a copy may share keys_ / values_: a copy (the cache's own copy constructor or assignment) sets it on both
  // sides, replacing the buffers clears it.
  class CopyMark {
   public:
    CopyMark() = default;
    CopyMark(const CopyMark& other) : set_(true) { other.set_ = true; }
    CopyMark& operator=(const CopyMark& other) {
      set_ = other.set_ = true;
      return *this;
    }
    CopyMark(CopyMark&&) noexcept = default;
    CopyMark& operator=(CopyMark&&) noexcept = default;
    explicit operator bool() const { return set_; }
    void clear() { set_ = false; }

   private:
    mutable bool set_ = false;
  };
  CopyMark shared_;
};

// Where one sequence's sliding-window layers hold its positions, as their rotating caches lay them out: `held` slots
// in use (at most the window W), the next position going to slot `next_slot` (W wraps to 0).
struct Rotation {
  int held = 0;
  int next_slot = 0;
};

// One layer's caches of B sequences decoded together (text/batch.h), one batch row each. Each row keeps
// its positions in the slots its own cache would (right padding, where mlx-lm's batch cache pads on the left):
// a full layer's position p in slot p, a sliding-window layer's where its rotating cache puts it (Rotation, the
// row's own). The slots past what a row holds are masked out, so its attention sums the same terms in the same
// order as alone, plus exact zeros. Rows join at the end and leave from anywhere.
class BatchKVCache {
 public:
  // window 0: a full layer; W > 0: a sliding-window layer, each row in at most W slots.
  explicit BatchKVCache(int window = 0) : window_(window) {}
  int window() const { return window_; }
  // The rotation a sequence's rotating cache continues with in this (sliding-window) layer: after a chunk the cache
  // holds up to W - 1 + T positions in order, of which its next write keeps the last W (KVCache::write_one_rotating);
  // regroup keeps those same slots.
  Rotation joining_rotation(const KVCache& cache) const;
  // The rows change in one copy of each buffer: rows `kept` of the buffers stay, in this order, then `joining`
  // come in as the last rows with the positions each holds; `longest`: the most slots a row holds after the change
  // (the buffers grow or shrink to what that needs). A joining cache with no positions is a row of zeros.
  void regroup(const std::vector<int>& kept, const std::vector<const KVCache*>& joining, int longest);
  // Write keys/values [B, H, 1, D] at each row's slot (int32 [B]: its position, or its rotation's next slot); return
  // the first `visible` slots of every row, [B, H, visible, D] (visible: the most slots a row holds after the write).
  std::pair<mx::array, mx::array> update_and_fetch(const mx::array& keys, const mx::array& values,
                                                   const mx::array& slots, int visible);
  // Row `index` as a lone cache that has seen `length` positions: a full one, or a rotating one holding the row's
  // rotation's slots.
  KVCache row(int index, int length, const Rotation& rotation) const;
  // The whole buffers [B, H, capacity, D], as the last update_and_fetch left them (for a kernel that reads each
  // row's own positions, nn/cuda_batch_attention.h).
  const mx::array& keys() const { return *keys_; }
  const mx::array& values() const { return *values_; }
  int rows() const { return rows_; }
  std::vector<mx::array> state() const;

 private:
  void resize(int capacity);

  int window_;
  std::optional<mx::array> keys_, values_;  // [B, H, capacity, D]; unset while every row is empty
  int rows_ = 0;
};

// One sequence's caches, a layer each: what the prompt cache keeps, and what a Generator resumes from.
// Copies are cheap (array handles) and independent.
struct SequenceCache {
  std::vector<KVCache> layers;

  // Positions held (every layer holds as many).
  int length() const { return layers.empty() ? 0 : layers[0].offset(); }
  // Whether every layer can forget its last n positions.
  bool can_trim(int n) const;
  // Forget the last n positions in every layer, or in none (false) if one of them cannot. In place: no layer is
  // copied, so a cache whose buffers are its own stays free to be written in place (KVCache::writes_in_place).
  bool trim(int n);
  // Whether every layer may be written in place (KVCache::writes_in_place): no copy shares its buffers.
  bool writes_in_place() const;
  size_t nbytes() const;
};

}  // namespace mlxr
