// Continuous batching: several sequences decoded together, one forward pass per step (as mlx-lm's
// BatchGenerator). A sequence joins after its own prefill (a Generator's, so the prompt cache and the
// chunked, cancellable prefill are the lone path's), decodes in the batch, and leaves at any step
// boundary with its caches. Each row samples with its own options (penalties, seed and draw count); the
// rows that sample greedily without penalties share one argmax.
//
// Rows join and leave between steps; the next step changes the batch's buffers for all of them at once
// (regroup), so a burst of N requests arriving or finishing together costs one copy of the batch, not N.
//
// Like Generator, each step() dispatches the next forward before it reads the tokens of the last one,
// so the device computes step n+1 while the host streams step n. Sliding-window layers batch with each row's
// rotating layout (BatchKVCache); models with latent attention (MLA) or attention sinks do not (Decoder::can_batch)
// and run one sequence at a time.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "text/decoder.h"
#include "text/generate.h"
#include "text/sampling.h"

namespace mlxr {

class BatchGenerator {
 public:
  explicit BatchGenerator(const Decoder& model);

  // A sequence joins as the last row: `cache` holds all of `prompt` but its last token (a Generator's
  // prefill, taken). top_logprobs as Generator's. Returns the row's id. Its first token comes from the
  // second step() after this: each step returns the tokens the step before it computed.
  int add(const std::vector<int>& prompt, const SamplerOptions& options, int top_logprobs, SequenceCache cache);
  // A sequence joins as the last row after its own Generator (made with max_tokens 1) has returned its first token:
  // the generator's prefill computed that token exactly as a lone run does (on a GPU a batched step's products round
  // differently from a many-row forward's, so a row joining with its last prompt token, as add() has it, could pick
  // another first token than its lone run). Its sampler goes on in the batch; the token is the row's first input.
  // Returns the row's id; its second token comes from the second step() after this.
  int join(Generator& generator);

  // One decode step of every row. Returns (row id, token) for each row that had a token computed.
  std::vector<std::pair<int, int>> step();

  // Row `id` leaves: its caches, holding its prompt and every token step() returned for it.
  SequenceCache remove(int id);

  // The log-probabilities of the token the last step() returned for row `id` (when asked for at add()).
  const std::optional<TokenLogprobs>& logprobs(int id) const { return find(id).logprobs; }
  // Positions row `id`'s caches hold.
  int position(int id) const { return find(id).length; }
  int size() const { return static_cast<int>(rows_.size()); }

 private:
  struct Row {
    int id;
    int length;      // positions its caches hold; the next token goes there
    int next_input;  // the token its first step feeds
    Sampler sampler;
    bool plain_greedy;  // argmax without penalties or logprobs: sampled with the others in one argmax
    int top_logprobs;
    bool computed = false;                 // whether pending_ holds its next token (false until its first step)
    int slot = -1;                         // its row in the batch's buffers, once it is in them
    Rotation rotation;                     // where its sliding-window layers hold its positions (if the model has any)
    std::optional<SequenceCache> joining;  // its caches until the next step puts them in the buffers (regroup)
    std::optional<PendingLogprobs> pending_logprobs;
    std::optional<TokenLogprobs> logprobs;
  };

  int push_row(SequenceCache cache, int next_input, Sampler sampler, int top_logprobs);
  void regroup();
  const Row& find(int id) const;
  int index_of(int id) const;
  mx::array sample(const mx::array& logits);  // [B, V] -> int32 [B]; sets rows' pending_logprobs
  mx::array positions_array(const std::vector<int>& positions);
  Decoder::WindowStep window_step();  // advances every row's rotation by the step's position

  const Decoder& model_;
  std::vector<BatchKVCache> cache_;   // a layer each
  int window_layer_ = -1;             // a sliding-window layer, if any (every one holds a sequence's positions alike)
  std::vector<Row> rows_;             // in batch order: the rows with computed tokens first
  int buffered_ = 0;                  // rows the buffers hold (rows that left since the last step included)
  std::optional<mx::array> pending_;  // int32: the next token of each computed row, not yet read
  // The last step's positions, on the host and as the array its kernels read (positions_array).
  std::vector<int> last_positions_;
  std::optional<mx::array> last_positions_array_;
  int next_id_ = 0;
};

}  // namespace mlxr
