#include "diffusion/step_cache.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace mlxr {

bool StepCacheBranch::should_compute(const mx::array& head_residual) {
  auto residual = mx::astype(head_residual, mx::float32);
  bool compute = !head_residual_ || !tail_residual_;
  if (!compute) {
    // diffusers: (r - r_last).abs().mean() / r_last.abs().mean() > threshold (float32 here in every dtype).
    auto change =
        mx::divide(mx::mean(mx::abs(mx::subtract(residual, *head_residual_))), mx::mean(mx::abs(*head_residual_)));
    compute = change.item<float>() > threshold_;
  }
  if (compute) {
    head_residual_ = residual;  // only computed evaluations move the reference, as diffusers'
    ++computed_;
  } else {
    ++skipped_;
  }
  decisions_.push_back(compute);
  return compute;
}

mx::array StepCacheBranch::reuse(const mx::array& head_output) const {
  if (!tail_residual_) throw std::logic_error("StepCacheBranch::reuse before any computed evaluation");
  return mx::add(*tail_residual_, head_output);
}

void StepCacheBranch::remember(const mx::array& head_output, const mx::array& tail_output) {
  tail_residual_ = mx::subtract(tail_output, head_output);
  mx::async_eval(*tail_residual_);  // so the outputs it is made of need not stay alive
}

StepCache::StepCache(float threshold) : threshold_(threshold) {
  if (!std::isfinite(threshold) || threshold <= 0.0f) {
    throw std::invalid_argument("the step cache threshold must be a finite number > 0, got " +
                                std::to_string(threshold));
  }
}

StepCacheBranch& StepCache::branch(int index) {
  if (index < 0) throw std::invalid_argument("a step cache branch index must be >= 0");
  while (static_cast<int>(branches_.size()) <= index) branches_.emplace_back(threshold_);
  return branches_[index];
}

int StepCache::computed() const {
  int n = 0;
  for (const auto& b : branches_) n += b.computed();
  return n;
}

std::vector<bool> StepCache::decisions(int index) const {
  if (index < 0 || index >= static_cast<int>(branches_.size())) return {};
  return branches_[index].decisions();
}

int StepCache::skipped() const {
  int n = 0;
  for (const auto& b : branches_) n += b.skipped();
  return n;
}

}  // namespace mlxr
