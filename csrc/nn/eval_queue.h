// Runs a lazily built network on the device a block at a time, with a bounded amount of work queued.
//
// Why: MLX keeps every input of every queued kernel alive until the device has run it, and its
// scheduler lets the host run up to 10 command batches ahead. Evaluated once per step, a 1024²
// DiT step therefore held ~11.6 GiB of activations at its peak on an H200 (diffusers: 0.5 GiB),
// and the device sat idle between steps while the host built the next step's graph (16 ms of a
// 130 ms step; benchmarks/README.md). Pushing each block's output instead keeps at most `depth`
// blocks queued: the host builds block j + 1 while the device runs block j, across step boundaries
// too, and only those blocks' activations are alive.
#pragma once

#include <deque>
#include <functional>
#include <vector>

#include "mlx/mlx.h"

namespace mlxr {

namespace mx = mlx::core;

// Two blocks: one running, one ready behind it. On an H200 at 1024² depths 1, 2 and 4 ran a 9-step
// Z-Image denoise equally fast (0.967 / 0.969 / 0.964 s) and peaked 1.41 / 1.68 / 2.59 GiB above the
// weights (unbounded: 8.95); 2 leaves the host slack where blocks are shorter (smaller images).
constexpr int kDefaultEvalQueueDepth = 2;

class EvalQueue {
 public:
  // Called after each push; it throws to stop the network mid-step (a cancelled job).
  using BetweenBlocks = std::function<void()>;

  // depth 0 means unbounded: only push()'s async_eval, no waiting (the whole-step behaviour when
  // pushed once a step). A negative depth is an error that names the queue_depth argument.
  explicit EvalQueue(int depth, BetweenBlocks between_blocks = {});

  // Starts evaluating `outputs` (one block's) on the device, waits until at most `depth` pushed
  // blocks are unfinished, then calls between_blocks: a cancel lands within a block or so of work.
  void push(const std::vector<mx::array>& outputs);

 private:
  int depth_;
  BetweenBlocks between_blocks_;
  std::deque<std::vector<mx::array>> queued_;
};

}  // namespace mlxr
