#include "text/eval_worker.h"

#include <chrono>
#include <cstdlib>

namespace mlxr {

int EvalWorker::switched_on() {
  static const int level = [] {
    const char* value = std::getenv("MLXRUNNER_EVAL_THREAD");
    return value == nullptr ? 0 : std::atoi(value);
  }();
  return level;
}

EvalWorker& EvalWorker::instance() {
  // Never destroyed: its thread waits for work until the process ends.
  static EvalWorker* worker = new EvalWorker();
  return *worker;
}

EvalWorker::EvalWorker() : stream_(mx::new_thread_unsafe_stream(mx::default_device())), thread_([this] { run(); }) {}

void EvalWorker::Session::queue(std::vector<mx::array> outputs) {
  worker_.queue(std::move(outputs));
}

void EvalWorker::Session::finish() {
  finished_ = true;
  worker_.drain();
}

EvalWorker::Session::~Session() {
  if (!finished_) {
    try {
      worker_.drain();
    } catch (...) {  // the forward is already failing: its own exception is the one that goes on
    }
  }
}

EvalWorker::StreamLease::StreamLease(EvalWorker& worker)
    : lease_(worker.lease_mutex_), previous_(mx::default_stream(worker.stream_.device)) {
  mx::set_default_stream(worker.stream_);
}

EvalWorker::StreamLease::~StreamLease() {
  mx::set_default_stream(previous_);
}

void EvalWorker::queue(std::vector<mx::array> outputs) {
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(std::move(outputs));
    queued_.fetch_add(1, std::memory_order_release);
  }
  work_.notify_one();
}

void EvalWorker::drain() {
  std::unique_lock lock(mutex_);
  idle_.wait(lock, [this] { return queue_.empty() && !busy_; });
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void EvalWorker::run() {
  std::unique_lock lock(mutex_);
  while (true) {
    if (queue_.empty()) {
      // A forward queues a layer every ~100-200 us: waiting on the condition variable alone would add the kernel's
      // wake-up (tens of us) to every layer, so the worker first watches the counter for a while.
      const auto seen = queued_.load(std::memory_order_acquire);
      lock.unlock();
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (queued_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until) {
      }
      lock.lock();
    }
    work_.wait(lock, [this] { return !queue_.empty(); });
    auto outputs = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    const bool failed = error_ != nullptr;  // after an error, the rest of that forward is dropped
    lock.unlock();
    std::exception_ptr error;
    try {
      if (!failed) mx::async_eval(std::move(outputs));
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (error) error_ = error;
    busy_ = false;
    if (queue_.empty()) idle_.notify_all();
  }
}

}  // namespace mlxr
