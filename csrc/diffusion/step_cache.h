// Step caching: the first-block cache (diffusers' FirstBlockCache, after ParaAttention's "first
// block cache", a simpler relative of TeaCache).
//
// Between nearby steps of a denoising run most transformer blocks change the hidden states by
// nearly the same residual. Each network evaluation runs its first ("head") block; when the head's
// residual (output - input) differs from the one at the last computed evaluation by at most
// `threshold` relative mean absolute difference,
//     mean|r - r_last| / mean|r_last| <= threshold,
// the remaining blocks are skipped and their residual from that evaluation (last block's output -
// head's output) is added to the head's output instead. The first evaluation always runs in full.
//
// Each branch (CFG's conditional and unconditional calls, when they are separate network calls) keeps
// its own state, as diffusers keeps one per cache context. The decision reads a number back from
// the device once per evaluation, so a cached run waits for the head block each step.
#pragma once

#include <deque>
#include <optional>
#include <vector>

#include "mlx/mlx.h"

namespace mlxr {

namespace mx = mlx::core;

// The cache state of one branch. The network calls should_compute() after its head block, then
// either remember() after its last block or reuse() instead of the remaining blocks.
class StepCacheBranch {
 public:
  explicit StepCacheBranch(float threshold) : threshold_(threshold) {}

  // Whether the remaining blocks must run for this head residual (a device sync); counts the evaluation.
  bool should_compute(const mx::array& head_residual);
  // What the last block would output: the head's output plus the remembered tail residual.
  mx::array reuse(const mx::array& head_output) const;
  // After a computed evaluation: the tail residual (last block's output - head's output) to reuse.
  void remember(const mx::array& head_output, const mx::array& tail_output);

  int computed() const { return computed_; }
  int skipped() const { return skipped_; }
  // One entry per evaluation so far, in order: whether it ran in full.
  const std::vector<bool>& decisions() const { return decisions_; }

 private:
  float threshold_;
  std::optional<mx::array> head_residual_;  // float32, of the last computed evaluation
  std::optional<mx::array> tail_residual_;
  int computed_ = 0, skipped_ = 0;
  std::vector<bool> decisions_;
};

// One denoising run's cache: a branch per separate network call of a step.
class StepCache {
 public:
  // threshold > 0 (finite); 0 would be no caching, which is no StepCache at all.
  explicit StepCache(float threshold);

  // The state of branch `index` (0: the conditional call, 1: CFG's unconditional one), made on first use.
  StepCacheBranch& branch(int index);
  // Forgets every branch and count: the denoising loops call it as a run starts.
  void reset() { branches_.clear(); }

  float threshold() const { return threshold_; }
  int computed() const;  // network evaluations run in full, all branches
  int skipped() const;   // network evaluations whose remaining blocks were skipped
  // Branch `index`'s decisions (StepCacheBranch::decisions); empty for a branch that never ran.
  std::vector<bool> decisions(int index) const;

 private:
  float threshold_;
  std::deque<StepCacheBranch> branches_;  // a deque: references stay valid as it grows
};

}  // namespace mlxr
