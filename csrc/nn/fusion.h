// Element-wise chains fused into one kernel on a GPU.
//
// On a GPU, a chain of element-wise ops runs as one kernel through mx::compile (mlx-lm compiles its
// swiglu the same way): one launch instead of several, and no intermediate written out. On the
// CPU the plain ops run instead: MLX's CPU compile would build C++ with the system compiler at run
// time. MLXRUNNER_FUSE_ON_CPU=1 compiles on the CPU too, so that machines without a GPU can check
// the fused functions' arithmetic (tests/gpu/test_fused.py).
#pragma once

#include <functional>
#include <vector>

#include "mlx/mlx.h"

namespace mlxr {

namespace mx = mlx::core;

using ElementwiseFn = std::vector<mx::array> (*)(const std::vector<mx::array>&);
using CompiledFn = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;

// Whether element-wise chains run fused (a GPU, or MLXRUNNER_FUSE_ON_CPU).
bool fuse_elementwise();

// The first output of `fn` on `inputs`: through `compiled` (the caller's static
// mx::compile(fn, shapeless) of the same function) when fusing, as plain ops otherwise.
mx::array run_fused(const CompiledFn& compiled, ElementwiseFn fn, const std::vector<mx::array>& inputs);

}  // namespace mlxr
