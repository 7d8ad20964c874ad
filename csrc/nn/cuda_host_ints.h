// Small int32 arrays from the host into device memory through a kernel's parameters (a request's prompt tokens).
#pragma once

#include <optional>
#include <span>
#include <string>

#include "mlx/array.h"

namespace mlxr {

namespace mx = mlx::core;

// At most this many values a call: the prefill's chunk (llm/model.py's PREFILL_CHUNK); a kernel's parameters hold
// 4 KB, 2 KB of them here.
inline constexpr int kMostHostInts = 512;

// `values` as an int32 array [1, n] in device memory, written by a one-thread kernel whose parameters carry them; on
// CUDA only, for 1 <= n <= kMostHostInts (nullopt otherwise).
//
// Why: MLX makes an array from host data in CUDA's managed memory, which the GPU reads through page faults: ~130 µs
// before a request's first kernel could start on an H100 (session 30: the embedding's gather of 64 prompt ids took
// 134 µs, of one id 3.1), and when the cache hands that buffer out again the host's write migrates the pages back.
// A kernel's parameters travel with its launch, and its output is device memory (MLX's stream-ordered pool).
std::optional<mx::array> cuda_int32_from_host(std::span<const int> values);

// Whether a prompt's tokens take that way (the measuring switch MLXRUNNER_HOST_INTS_BY_KERNEL=1; off until a GPU run
// times it against MLX's managed array: benchmarks/gpu/follow_up_slack.py --env MLXRUNNER_HOST_INTS_BY_KERNEL=1).
bool host_ints_by_kernel_switched_on();

// The PTX of the kernel for up to `capacity` values (one thread, a store each below n): the kernel
// `mlxr_host_ints_<capacity>(int* out, int count, int v0, ..., int v<capacity - 1>)`. Exposed for the unit test.
std::string host_ints_ptx(int capacity);

}  // namespace mlxr
