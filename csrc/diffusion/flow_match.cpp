#include "diffusion/flow_match.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace mlxr {

std::vector<double> linspace(double start, double stop, int n) {
  std::vector<double> out(std::max(n, 0));
  if (n == 1) {
    out[0] = start;
    return out;
  }
  // numpy: start + i * step, and the last value exactly stop.
  const double step = (stop - start) / (n - 1);
  for (int i = 0; i < n; ++i) out[i] = start + i * step;
  if (n > 1) out[n - 1] = stop;
  return out;
}

std::vector<float> flow_match_sigmas(const std::vector<double>& base, const FlowMatchSchedule& schedule,
                                     std::optional<double> mu) {
  if (base.empty()) throw std::invalid_argument("a schedule needs at least one step");
  std::vector<float> sigmas;
  sigmas.reserve(base.size() + 1);
  for (double b : base) {
    // set_timesteps converts the pipeline's sigmas to a float32 array first; numpy then does every
    // shift operation in float32 (python-float scalars do not upcast a float32 array).
    const float s = static_cast<float>(b);
    float shifted;
    if (schedule.use_dynamic_shifting) {
      if (!mu) throw std::invalid_argument("dynamic shifting needs mu");
      if (schedule.time_shift_type == "linear") {
        const float m = static_cast<float>(*mu);
        shifted = m / (m + (1.0f / s - 1.0f));
      } else {
        const float e = static_cast<float>(std::exp(*mu));
        shifted = e / (e + (1.0f / s - 1.0f));
      }
    } else {
      const float k = schedule.shift;
      shifted = (k * s) / (1.0f + (k - 1.0f) * s);
    }
    sigmas.push_back(shifted);
  }
  sigmas.push_back(0.0f);
  return sigmas;
}

std::optional<mx::array> denoise(mx::array x, const std::vector<float>& sigmas, const Velocity& velocity,
                                 const StepCallback& on_step, EvalQueue& queue) {
  const int total = static_cast<int>(sigmas.size()) - 1;
  if (total < 1) throw std::invalid_argument("denoise needs at least one step");
  x = mx::astype(x, mx::float32);
  for (int i = 0; i < total; ++i) {
    if (on_step && !on_step(i, total)) return std::nullopt;
    auto v = mx::astype(velocity(x, i), mx::float32);
    const float dt = sigmas[i + 1] - sigmas[i];
    x = mx::add(x, mx::multiply(mx::array(dt), v));
    queue.push({x});
  }
  mx::eval(x);
  if (on_step && !on_step(total, total)) return std::nullopt;
  return x;
}

}  // namespace mlxr
