// Rotary position embeddings with the scalings Hugging Face configs name (rope_scaling).
#pragma once

#include <optional>
#include <string>

#include "nn/weights.h"

namespace mlxr {

struct RopeConfig {
  int dims = 0;              // rotated dimensions (the head dim for Llama/Qwen)
  float base = 10000.0f;     // rope_theta
  bool traditional = false;  // false: rotate halves (HF's rotate_half), true: interleaved pairs
  std::string type = "default";  // default | linear | llama3
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position = 8192;
};

class Rope {
 public:
  explicit Rope(const RopeConfig& config);
  // x: [B, H, T, D]; positions start at `offset`.
  mx::array operator()(const mx::array& x, int offset) const;

 private:
  RopeConfig config_;
  float scale_ = 1.0f;
  std::optional<mx::array> periods_;  // llama3: per-pair wavelength divisors, computed in double
};

}  // namespace mlxr
