// Activation functions. SiLU and the gated SiLU run as one fused kernel on a GPU (nn/fusion.h).
#pragma once

#include <string>

#include "nn/erf_coefficients.h"
#include "nn/weights.h"

namespace mlxr {

// GELU as PyTorch's default (exact, erf based): x * 0.5 * (1 + erf(x / sqrt(2))), erf by Eigen's
// rational function (nn/erf_coefficients.h). On the CPU
// in float32 it runs as one multi-threaded kernel with the same result (nn/cpu_kernels.h).
mx::array gelu(const mx::array& x);

// GELU with the tanh approximation ("gelu_new", "gelu_pytorch_tanh").
mx::array gelu_tanh(const mx::array& x);

// Activation by its Hugging Face config name (hidden_act); throws for an unknown name.
mx::array activation(const std::string& name, const mx::array& x);
bool is_known_activation(const std::string& name);

// x * sigmoid(x).
mx::array silu(const mx::array& x);

// silu(gate) * up, the gated MLP of the LLMs and DiTs.
mx::array gated_silu(const mx::array& gate, const mx::array& up);

}  // namespace mlxr
