// A thread that evaluates (mx::async_eval) what a forward queues, layer by layer, while the calling thread builds the
// next layer. On a GPU a waited-for forward (a request's prefill) is bound by the host: MLX's encoding of a layer
// (its kernels' launches, cuBLAS's planning and stream capture) and our building of the next one run one after the
// other on one thread, and the device, done with a layer, waits for them. With the worker the two overlap.
//
// MLX 0.32 gives each thread its own default stream, and a thread can encode only its own streams; a stream made by
// new_thread_unsafe_stream can be encoded from any thread, one at a time. The forward builds its layers on such a
// stream (EvalWorker::Session), the worker encodes them, and the forward drains the worker before anything else is
// evaluated on that stream.
//
// Off by default: timed on an H100 (session 31), the prompt cache follow-up's forward returned at ~6 ms instead of 8.2,
// but sampling its logits on the caller's own stream then cost a fence between the streams, and the request was not
// faster (benchmarks/README.md "Session 31"). StreamLease, which keeps the generator's own work on the worker's
// stream, came after that timing.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "mlx/mlx.h"

namespace mlxr {

namespace mx = mlx::core;

class EvalWorker {
 public:
  // The process's worker, started at first use, its stream on the default device of that moment.
  static EvalWorker& instance();
  // MLXRUNNER_EVAL_THREAD=1 turns it on for a GPU's waited-for forwards, 2 for every waited-for forward, the CPU's
  // too (to test it here); a measuring switch while its gain is timed.
  static int switched_on();

  // The calling thread builds and evaluates on the worker's stream while this lives, holding it against other threads
  // (the stream is not thread-safe). A generator's work between its forwards (sampling, decode steps) takes one, so
  // that the logits a forward made there are sampled without a fence between two streams; a Session inside it, on
  // the same thread, lends the stream to the worker.
  class StreamLease {
   public:
    explicit StreamLease(EvalWorker& worker);
    ~StreamLease();
    StreamLease(const StreamLease&) = delete;
    StreamLease& operator=(const StreamLease&) = delete;

   private:
    std::unique_lock<std::recursive_mutex> lease_;
    mx::Stream previous_;
  };

  // One forward's use of the worker: the stream leased to the calling thread, which builds on it and queues what the
  // worker encodes. finish() waits for the worker and rethrows its error; a Session left by an exception waits too,
  // so nothing else meets the worker on that stream.
  class Session {
   public:
    explicit Session(EvalWorker& worker) : worker_(worker), lease_(worker) {}
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    // Encode `outputs` on the worker, after everything queued before.
    void queue(std::vector<mx::array> outputs);
    void finish();

   private:
    EvalWorker& worker_;
    StreamLease lease_;  // released after the destructor has drained the worker
    bool finished_ = false;
  };

 private:
  EvalWorker();
  void run();
  void queue(std::vector<mx::array> outputs);
  // Wait until the worker has encoded all it was given; rethrows the first error it met.
  void drain();

  // How long the idle worker watches for new work before it sleeps.
  static constexpr std::chrono::microseconds kSpin{2000};

  mx::Stream stream_;
  std::recursive_mutex lease_mutex_;  // held by the thread that builds on stream_ (StreamLease)
  std::atomic<long long> queued_{0};  // arrays ever queued: what the spinning worker watches
  std::mutex mutex_;
  std::condition_variable work_, idle_;
  std::deque<std::vector<mx::array>> queue_;
  bool busy_ = false;
  std::exception_ptr error_;
  std::thread thread_;
};

}  // namespace mlxr
