// Named weights handed over from Python (safetensors, mmap'd) as a name -> mx::array map.
//
// Networks take their tensors out of a Weights view once, at load, with the shape they expect.
// A missing tensor or a wrong shape is an error that names the tensor, so a bad model folder
// fails at load time with a message a user can act on, never with a broadcast error mid-request.
#pragma once

#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "mlx/mlx.h"

namespace mlxr {

namespace mx = mlx::core;
using WeightMap = std::unordered_map<std::string, mx::array>;

class Weights {
 public:
  explicit Weights(const WeightMap& map, std::string prefix = "") : map_(&map), prefix_(std::move(prefix)) {}

  // A view whose names are relative to `prefix` (joined with a dot).
  Weights sub(const std::string& prefix) const;

  // The tensor `name`, which must exist and have exactly `shape`.
  mx::array get(const std::string& name, const mx::Shape& shape) const;

  // The tensor `name` if present (checked against `shape`), else nullopt.
  std::optional<mx::array> maybe(const std::string& name, const mx::Shape& shape) const;

  bool has(const std::string& name) const;
  std::string full_name(const std::string& name) const;

 private:
  const WeightMap* map_;
  std::string prefix_;
};

std::string shape_string(const mx::Shape& shape);

}  // namespace mlxr
