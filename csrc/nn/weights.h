// Named weights handed over from Python (safetensors, mmap'd) as a name -> mx::array map.
//
// Networks take their tensors out of a Weights view once, at load, with the shape they expect.
// A missing tensor or a wrong shape is an error that names the tensor, so a bad model folder
// fails at load time with a message a user can act on, never with a broadcast error mid-request.
//
// Quantized checkpoints (docs/formats.md): a weight matrix `X` may be stored packed, as MLX's
// mx::quantize left it: `X` uint32 [rows, cols * bits / 32] with `X_scale` [rows, cols / group_size]
// and, for affine modes, `X_qbias` like the scales (the store's canonical names); an nvfp4 weight may
// also have `X_global_scale`, a float32 scalar by which the dequantized weight is multiplied (ModelOpt's
// `weight_scale_2`). Python says which weights are packed, and how, in a QuantMap; Weights::matrix hands
// either form out, checked against the shape the network expects.
#pragma once

#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "mlx/mlx.h"
#include "nn/config_fields.h"

namespace mlxr {

namespace mx = mlx::core;
using WeightMap = std::unordered_map<std::string, mx::array>;

// How a packed weight was quantized: mx::quantize's group_size, bits and mode.
struct QuantSpec {
  int bits = 4;
  int group_size = 64;
  std::string mode = "affine";  // affine | mxfp4 | nvfp4 | mxfp8

  MLXR_CONFIG_FIELDS(QuantSpec, bits, group_size, mode)
  bool operator==(const QuantSpec&) const = default;
};
// Packed weight name (the full name, "model.layers.0.self_attn.q_proj.weight") -> how it was quantized.
using QuantMap = std::unordered_map<std::string, QuantSpec>;

// What a packed weight needs besides its uint32 values to be multiplied or dequantized.
struct Quantized {
  mx::array scales;
  std::optional<mx::array> biases;  // affine modes only
  QuantSpec spec;
  // nvfp4 only: W = dequantize(...) * global_scale, a float32 scalar (stacked experts: one per expert,
  // [E]). MLX 0.32.4's quantized_matmul takes no global scale (and dequantize's means g / 2688, not
  // ModelOpt's g), so the product is scaled after the matmul, as Ollama does: (x W_q^T) g = x (W_q g)^T.
  std::optional<mx::array> global_scale;
};

// A weight matrix [rows, cols] as the checkpoint has it: float, or packed uint32 with `quantized` set.
struct Matrix {
  mx::array weight;
  std::optional<Quantized> quantized;
};

class Weights {
 public:
  explicit Weights(const WeightMap& map, std::string prefix = "") : map_(&map), prefix_(std::move(prefix)) {}
  Weights(const WeightMap& map, const QuantMap& quantization, std::string prefix = "")
      : map_(&map), quantization_(&quantization), prefix_(std::move(prefix)) {}

  // A view whose names are relative to `prefix` (joined with a dot).
  Weights sub(const std::string& prefix) const;

  // The tensor `name`, which must exist and have exactly `shape`.
  mx::array get(const std::string& name, const mx::Shape& shape) const;

  // The tensor `name` if present (checked against `shape`), else nullopt.
  std::optional<mx::array> maybe(const std::string& name, const mx::Shape& shape) const;

  // The weight matrix `name` of logical shape [rows, cols]: float, or packed with its companions when
  // the QuantMap lists it. Either must fit the shape; a packed weight the QuantMap does not list is an error.
  Matrix matrix(const std::string& name, int rows, int cols) const;
  // The same for matrices stacked along leading axes `stack` (a mixture's experts: [E, rows, cols]).
  Matrix stacked_matrix(const std::string& name, const mx::Shape& stack, int rows, int cols) const;
  // The same from the MXFP4 layout of transformers' Mxfp4 checkpoints (GPT-OSS): `name_blocks` uint8
  // [..., rows, cols / 32, 16], two FP4 (E2M1) values a byte, the lower nibble first, and `name_scales` uint8
  // [..., rows, cols / 32], an E8M0 exponent per 32 values. That is MLX's mxfp4 bit for bit, so the bytes
  // are only viewed as MLX's uint32 words, never dequantized.
  Matrix mxfp4_blocks(const std::string& name, const mx::Shape& stack, int rows, int cols) const;

  bool has(const std::string& name) const;
  std::string full_name(const std::string& name) const;

 private:
  Quantized companions(const std::string& name, const QuantSpec& spec, const mx::Shape& groups) const;
  std::optional<mx::array> global_scale(const std::string& name, const QuantSpec& spec) const;
  static Matrix for_cuda(const std::string& full, const mx::array& packed, const Quantized& q, int cols);

  const WeightMap* map_;
  const QuantMap* quantization_ = nullptr;
  std::string prefix_;
};

std::string shape_string(const mx::Shape& shape);

// bfloat16 or float16: the dtypes MLX's CPU has no BLAS path for, and our CUDA decode kernel takes.
inline bool half_precision(mx::Dtype dtype) {
  return dtype == mx::bfloat16 || dtype == mx::float16;
}

// True when MLX computes on an NVIDIA GPU (its CUDA kernels accept fewer quantized shapes than the CPU's).
bool running_on_cuda();

// Whether MLX 0.32.4's CUDA kernels multiply a packed weight of `columns` in groups of `group_size`: only if the
// columns are a multiple of max(64, group size). A weight that is not is unpacked at load (Weights::for_cuda).
bool cuda_runs_packed(int columns, int group_size);

}  // namespace mlxr
