#include "nn/eval_queue.h"

#include <stdexcept>
#include <string>
#include <utility>

namespace mlxr {

EvalQueue::EvalQueue(int depth, BetweenBlocks between_blocks)
    : depth_(depth), between_blocks_(std::move(between_blocks)) {
  if (depth < 0) {
    throw std::invalid_argument("queue_depth must be >= 0 (0: unbounded), got " + std::to_string(depth));
  }
}

void EvalQueue::push(const std::vector<mx::array>& outputs) {
  mx::async_eval(outputs);
  if (depth_ > 0) {
    queued_.push_back(outputs);
    while (static_cast<int>(queued_.size()) > depth_) {
      for (auto& output : queued_.front()) output.wait();  // scheduled already: wait() only waits for the device
      queued_.pop_front();
    }
  }
  if (between_blocks_) between_blocks_();
}

}  // namespace mlxr
