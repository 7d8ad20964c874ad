// One slice the networks take everywhere: a range of one axis, every other axis whole.
#pragma once

#include <mlx/mlx.h>

namespace mlxr {

namespace mx = mlx::core;

// x[..., begin:end, ...] along `axis` (negative counts from the last): a view, no copy.
inline mx::array axis_slice(const mx::array& x, int axis, int begin, int end) {
  if (axis < 0) axis += x.ndim();
  mx::Shape start(x.ndim(), 0), stop = x.shape();
  start[axis] = begin;
  stop[axis] = end;
  return mx::slice(x, start, stop);
}

}  // namespace mlxr
