#include "nn/weights.h"

#include <algorithm>
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
  auto quantized = companions(name, *spec, shape(cols / spec->group_size));
  if (running_on_cuda()) return for_cuda(full, packed, quantized, cols);
  return Matrix{packed, quantized};
}

Matrix Weights::mxfp4_blocks(const std::string& name, const mx::Shape& stack, int rows, int cols) const {
  const std::string full = full_name(name + "_blocks");
  if (cols % 32 != 0)
    throw std::invalid_argument("weight " + full + ": " + std::to_string(cols) + " columns are not MXFP4 blocks of 32");
  mx::Shape groups = stack;
  groups.insert(groups.end(), {rows, cols / 32});
  mx::Shape blocks_shape = groups;
  blocks_shape.push_back(16);
  auto blocks = get(name + "_blocks", blocks_shape);
  auto scales = get(name + "_scales", groups);
  for (const auto& [suffix, array] : {std::pair{"_blocks", blocks}, std::pair{"_scales", scales}}) {
    if (array.dtype() != mx::uint8)
      throw std::invalid_argument("weight " + full_name(name + suffix) + " must be uint8");
  }
  mx::Shape bytes_shape = stack;
  bytes_shape.insert(bytes_shape.end(), {rows, cols / 2});
  auto packed = mx::view(mx::reshape(blocks, bytes_shape), mx::uint32);  // [..., rows, cols / 8]
  Quantized quantized{.scales = scales, .spec = QuantSpec{.bits = 4, .group_size = 32, .mode = "mxfp4"}};
  if (running_on_cuda()) return for_cuda(full, packed, quantized, cols);
  return Matrix{packed, quantized};
}

// MLX 0.32.4's CUDA kernels refuse 1-bit weights, and multiply a packed weight only if its columns are a
// multiple of max(64, group size) (cuda_runs_packed; else "no implementation for problem shape" at the first prompt).
// Real checkpoints' layers always are; a layer that is not is unpacked to float here, at load, instead of failing
// mid-request (only that layer grows; the log of the load shows nothing else changes).
Matrix Weights::for_cuda(const std::string& full, const mx::array& packed, const Quantized& q, int cols) {
  if (q.spec.mode == "affine" && q.spec.bits == 1) {
    throw std::invalid_argument("weight " + full + ": 1-bit quantization does not run on CUDA (MLX's kernels lack it)");
  }
  if (cuda_runs_packed(cols, q.spec.group_size)) return Matrix{packed, q};
  auto unpacked = mx::dequantize(packed, q.scales, q.biases, q.spec.group_size, q.spec.bits, q.spec.mode);
  if (q.global_scale) unpacked = mx::multiply(unpacked, mx::astype(*q.global_scale, unpacked.dtype()));
  // Now, not at the first request: a network whose loader reads only the checkpoint's arrays (the DiTs) would
  // otherwise hold the packed arrays until then and grow by the float copy mid-request (seen on an H200: a tiny
  // Z-Image's held bytes after load were its packed ones).
  mx::eval(unpacked);
  return Matrix{unpacked, std::nullopt};
}

bool cuda_runs_packed(int columns, int group_size) {
  return columns % std::max(64, group_size) == 0;
}

bool running_on_cuda() {
  static const bool cuda = mx::cu::is_available();  // asked once: the hot paths (RoPE, decode products) ask per call
  return cuda && mx::default_device() == mx::Device::gpu;
}

Quantized Weights::companions(const std::string& name, const QuantSpec& spec, const mx::Shape& groups) const {
  auto scales = get(name + "_scale", groups);
  std::optional<mx::array> biases;
  if (spec.mode == "affine") {
    biases = get(name + "_qbias", groups);
  } else if (has(name + "_qbias")) {
    throw std::invalid_argument("weight " + full_name(name) + ": " + spec.mode + " quantization has no biases");
  }
  return Quantized{scales, biases, spec, global_scale(name, spec)};
}

std::optional<mx::array> Weights::global_scale(const std::string& name, const QuantSpec& spec) const {
  auto it = map_->find(full_name(name + "_global_scale"));
  if (it == map_->end()) return std::nullopt;
  const auto& scale = it->second;
  if (spec.mode != "nvfp4") {
    throw std::invalid_argument("weight " + full_name(name) + ": a global scale belongs to nvfp4, not " + spec.mode);
  }
  if (scale.size() != 1 || scale.dtype() != mx::float32) {
    throw std::invalid_argument("weight " + full_name(name) + ": the global scale must be one float32, not shape " +
                                shape_string(scale.shape()));
  }
  return mx::reshape(scale, {});
}

}  // namespace mlxr
