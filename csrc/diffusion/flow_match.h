// Flow matching: diffusers' FlowMatchEulerDiscreteScheduler (the parts our pipelines use) and the
// denoising loop.
//
// The loop integrates dx/dsigma = v from sigma = sigmas[0] (pure noise, 1) to sigmas[N] = 0 with
// Euler steps, in float32 whatever the network's dtype: x <- x + (sigma[i+1] - sigma[i]) * v.
// `steps` in our API means N: the number of network evaluations (as diffusers counts
// num_inference_steps); the schedule has N + 1 sigmas, the last one 0.
#pragma once

#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "mlx/mlx.h"

namespace mlxr {

namespace mx = mlx::core;

struct FlowMatchSchedule {
  int num_train_timesteps = 1000;
  float shift = 1.0f;                   // static shift (use_dynamic_shifting false)
  bool use_dynamic_shifting = false;    // true: shift by exp(mu), mu from the image size
  std::string time_shift_type = "exponential";  // exponential | linear (dynamic shifting only)
};

// The N + 1 sigmas of an N-step run, the last one 0, for the base sigmas `base` (the pipeline's
// choice, e.g. linspace(1, 1/N, N)) as the scheduler's set_timesteps(sigmas=..., mu=...) computes them:
// float32 throughout, static or dynamic shift as the config says (mu is ignored unless dynamic).
std::vector<float> flow_match_sigmas(const std::vector<double>& base, const FlowMatchSchedule& schedule,
                                     std::optional<double> mu = std::nullopt);

// numpy.linspace(start, stop, n) in float64, as pipelines make their base sigmas.
std::vector<double> linspace(double start, double stop, int n);

// Runs a lazily built network on the device a block at a time, with a bounded amount of work queued.
//
// Why: MLX keeps every input of every queued kernel alive until the device has run it, and its
// scheduler lets the host run up to 10 command batches ahead. Evaluated once per step, a 1024²
// DiT step therefore held ~11.6 GiB of activations at its peak on an H200 (diffusers: 0.5 GiB),
// and the device sat idle between steps while the host built the next step's graph (16 ms of a
// 130 ms step; benchmarks/README.md). Pushing each block's output instead keeps at most `depth`
// blocks queued: the host builds block j + 1 while the device runs block j, across step boundaries
// too, and only those blocks' activations are alive.
class EvalQueue {
 public:
  // depth 0 means unbounded: only push()'s async_eval, no waiting (the old whole-step behaviour
  // when pushed once a step). MLXRUNNER_DENOISE_QUEUE_DEPTH overrides the default (for A/B runs).
  explicit EvalQueue(int depth = default_depth());
  static int default_depth();

  // Starts evaluating `outputs` (one block's) on the device, then waits until at most `depth` pushed
  // blocks are unfinished.
  void push(const std::vector<mx::array>& outputs);

 private:
  int depth_;
  std::deque<std::vector<mx::array>> queued_;
};

// The network's velocity for latents x at step i (sigma = sigmas[i]); float32, shaped like x.
// The network pushes each block's output to `queue` (see EvalQueue).
using Velocity = std::function<mx::array(const mx::array& x, int step, EvalQueue& queue)>;
// Called with (i, N) before step i and (N, N) when done; returning false cancels the run.
using StepCallback = std::function<bool(int step, int total)>;

// Runs the Euler loop; nullopt when cancelled. When the callback runs for step i, all of step i - 1
// but the last few blocks queued on the device has run: the progress it reports is work done (to
// within those blocks), and a cancel takes effect within one step.
std::optional<mx::array> denoise(mx::array x, const std::vector<float>& sigmas, const Velocity& velocity,
                                 const StepCallback& on_step);

}  // namespace mlxr
