#include "nn/weights.h"

#include <stdexcept>

namespace mlxr {

// Plain string concatenation, no iostreams: with MLX's CUDA wheel loaded, a std::ostringstream
// built in this module crashed the process (segfault) on the lent H100, every time; to_string did not.
std::string shape_string(const mx::Shape& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + "]";
}

std::string Weights::full_name(const std::string& name) const {
  return prefix_.empty() ? name : prefix_ + "." + name;
}

Weights Weights::sub(const std::string& prefix) const {
  return Weights(*map_, full_name(prefix));
}

bool Weights::has(const std::string& name) const {
  return map_->count(full_name(name)) > 0;
}

std::optional<mx::array> Weights::maybe(const std::string& name, const mx::Shape& shape) const {
  auto it = map_->find(full_name(name));
  if (it == map_->end()) {
    return std::nullopt;
  }
  if (it->second.shape() != shape) {
    throw std::invalid_argument("weight " + full_name(name) + " has shape " + shape_string(it->second.shape()) +
                                ", expected " + shape_string(shape));
  }
  return it->second;
}

mx::array Weights::get(const std::string& name, const mx::Shape& shape) const {
  auto found = maybe(name, shape);
  if (!found) {
    throw std::invalid_argument("missing weight " + full_name(name));
  }
  return *found;
}

}  // namespace mlxr
