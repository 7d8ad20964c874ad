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
  Weights out(*map_, full_name(prefix));
  out.quantization_ = quantization_;
  return out;
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

Matrix Weights::matrix(const std::string& name, int rows, int cols) const {
  return stacked_matrix(name, {}, rows, cols);
}

Matrix Weights::stacked_matrix(const std::string& name, const mx::Shape& stack, int rows, int cols) const {
  const std::string full = full_name(name);
  auto shape = [&](int columns) {
    mx::Shape out = stack;
    out.push_back(rows);
    out.push_back(columns);
    return out;
  };
  const QuantSpec* spec = nullptr;
  if (quantization_) {
    auto it = quantization_->find(full);
    if (it != quantization_->end()) spec = &it->second;
  }
  if (!spec) {
    auto it = map_->find(full);
    if (it != map_->end() && it->second.dtype() == mx::uint32) {
      throw std::invalid_argument("weight " + full + " is packed (uint32) but no quantization parameters came with it");
    }
    return Matrix{get(name, shape(cols)), std::nullopt};
  }
  // Packed: `bits`-bit values, 32 / bits to a uint32 word (3, 5 and 6 bits straddle words).
  if ((static_cast<int64_t>(cols) * spec->bits) % 32 != 0 || cols % spec->group_size != 0) {
    throw std::invalid_argument("weight " + full + ": " + std::to_string(cols) + " columns do not pack at " +
                                std::to_string(spec->bits) + " bits in groups of " + std::to_string(spec->group_size));
  }
  auto packed = get(name, shape(static_cast<int>(static_cast<int64_t>(cols) * spec->bits / 32)));
  if (packed.dtype() != mx::uint32) {
    throw std::invalid_argument("weight " + full + " is listed as quantized but is not packed uint32");
  }
  return Matrix{packed, companions(name, *spec, shape(cols / spec->group_size))};
}

Quantized Weights::companions(const std::string& name, const QuantSpec& spec, const mx::Shape& groups) const {
  auto scales = get(name + "_scale", groups);
  std::optional<mx::array> biases;
  if (spec.mode == "affine") {
    biases = get(name + "_qbias", groups);
  } else if (has(name + "_qbias")) {
    throw std::invalid_argument("weight " + full_name(name) + ": " + spec.mode + " quantization has no biases");
  }
  return Quantized{scales, biases, spec};
}

}  // namespace mlxr
