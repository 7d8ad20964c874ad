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

// gated_silu of the columns [gate_at, gate_at + width) and [up_at, up_at + width) of `fused` [..., W], the output of
// a fused projection; on the CPU read in place (slices would each be copied before the kernel).
mx::array gated_silu_columns(const mx::array& fused, int gate_at, int up_at, int width);

}  // namespace mlxr
