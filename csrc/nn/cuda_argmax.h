// Greedy sampling's argmax on CUDA, in one kernel a row.
//
// MLX's argmax over a vocabulary (arg_reduce_general: one block, each thread's loads issued one iteration after
// another) took 19.5 us for Qwen3's 151,936 bfloat16 logits on an H100, every decode step, and it returns uint32,
// which the sampler then casts to int32 (one more operation for the host to build). Here one block of 1,024 threads a
// row issues 8 loads of 16 bytes each before it compares any (the 300 KB of a row in three rounds of loads in flight)
// and writes the index as int32. The same answer as mx::argmax: the first index of the largest value, a NaN counting
// as larger than any number (the first NaN's index, as numpy's argmax).
#pragma once

#include <optional>

#include "mlx/array.h"

namespace mlxr {

namespace mx = mlx::core;

// argmax of z [V] (-> int32 scalar) or of each row of z [rows, V] (-> int32 [rows]), float32 or half precision; nullopt
// off CUDA, for other ranks or dtypes, or with MLXRUNNER_CUDA_ARGMAX=0 (MLX's argmax then runs: to measure it).
std::optional<mx::array> cuda_argmax(const mx::array& z);

}  // namespace mlxr
