// One slice the networks take everywhere (a range of one axis, every other axis whole), and the shapes of a product
// over x's last axis.
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

// x's leading dimensions flattened: the rows of a product x W^T with x [..., K].
inline int64_t rows_of(const mx::array& x) {
  return static_cast<int64_t>(x.size()) / x.shape(-1);
}

// x's shape with its last axis n: the shape of such a product with W [n, K].
inline mx::Shape output_shape(const mx::array& x, int n) {
  auto shape = x.shape();
  shape.back() = n;
  return shape;
}

}  // namespace mlxr
