// The arrays a network holds, gathered layer by layer: what its Python side evaluates at load, so that the checkpoint
// is read (and fused projections built, nn/linear.h's FusedLinear) before the first request rather than during it.
#pragma once

#include <optional>
#include <vector>

#include "nn/linear.h"
#include "nn/norm.h"

namespace mlxr {

struct WeightList {
  std::vector<mx::array> arrays;

  WeightList& add(const mx::array& array) {
    arrays.push_back(array);
    return *this;
  }
  WeightList& add(const Linear& layer) { return add_all(layer.arrays()); }
  WeightList& add(const FusedLinear& layer) { return add_all(layer.arrays()); }
  WeightList& add(const RMSNorm& norm) { return add(norm.weight); }
  // An optional layer, array or norm: added when present.
  template <typename T>
  WeightList& add(const std::optional<T>& maybe) {
    return maybe ? add(*maybe) : *this;
  }
  // What a larger block's own arrays() hands over (an MLP, a mixture of experts, an embedding).
  WeightList& add_all(const std::vector<mx::array>& more) {
    arrays.insert(arrays.end(), more.begin(), more.end());
    return *this;
  }
};

}  // namespace mlxr
