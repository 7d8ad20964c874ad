// Flow matching: diffusers' FlowMatchEulerDiscreteScheduler (the parts our pipelines use) and the
// denoising loop.
//
// The loop integrates dx/dsigma = v from sigma = sigmas[0] (pure noise, 1) to sigmas[N] = 0 with
// Euler steps, in float32 whatever the network's dtype: x <- x + (sigma[i+1] - sigma[i]) * v.
// `steps` in our API means N: the number of network evaluations (as diffusers counts
// num_inference_steps); the schedule has N + 1 sigmas, the last one 0.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "diffusion/step_cache.h"
#include "mlx/mlx.h"
#include "nn/config_fields.h"
#include "nn/eval_queue.h"

namespace mlxr {

namespace mx = mlx::core;

// scheduler_config.json; defaults as FlowMatchEulerDiscreteScheduler.__init__'s (diffusers 0.42.1).
struct FlowMatchSchedule {
  int num_train_timesteps = 1000;
  float shift = 1.0f;                           // static shift (use_dynamic_shifting false)
  bool use_dynamic_shifting = false;            // true: shift by exp(mu), mu from the image size
  std::string time_shift_type = "exponential";  // exponential | linear (dynamic shifting only)

  MLXR_CONFIG_FIELDS(FlowMatchSchedule, num_train_timesteps, shift, use_dynamic_shifting, time_shift_type)
};

// The N + 1 sigmas of an N-step run, the last one 0, for the base sigmas `base` (the pipeline's
// choice, e.g. linspace(1, 1/N, N)) as the scheduler's set_timesteps(sigmas=..., mu=...) computes them:
// float32 throughout, static or dynamic shift as the config says (mu is ignored unless dynamic).
std::vector<float> flow_match_sigmas(const std::vector<double>& base, const FlowMatchSchedule& schedule,
                                     std::optional<double> mu = std::nullopt);

// numpy.linspace(start, stop, n) in float64, as pipelines make their base sigmas.
std::vector<double> linspace(double start, double stop, int n);

// The network's velocity for latents x at step i (sigma = sigmas[i]); float32, shaped like x. The
// network pushes each block's output to the queue the loop runs with (see EvalQueue).
using Velocity = std::function<mx::array(const mx::array& x, int step)>;
// Called with (i, N) before step i and (N, N) when done; returning false cancels the run.
using StepCallback = std::function<bool(int step, int total)>;

// How a model's denoising loop runs, apart from what it computes.
struct DenoiseControl {
  StepCallback on_step;                      // progress, and a cancel between steps
  EvalQueue::BetweenBlocks between_blocks;   // throws to cancel between transformer blocks (mid-step)
  int queue_depth = kDefaultEvalQueueDepth;  // transformer blocks queued on the device at most (0: unbounded)
  StepCache* cache = nullptr;                // the first-block cache; none: every block of every step runs
};

// Runs the Euler loop, the network's blocks and each step's latents pushed to `queue`; nullopt when
// cancelled. When the callback runs for step i, all of step i - 1 but the last few blocks queued on
// the device has run: the progress it reports is work done (to within those blocks), and a cancel
// takes effect within one step.
std::optional<mx::array> denoise(mx::array x, const std::vector<float>& sigmas, const Velocity& velocity,
                                 const StepCallback& on_step, EvalQueue& queue);

}  // namespace mlxr
