// A decode step's products with half-precision weights on CUDA: x W^T for one to four rows of x.
//
// A bf16 model's decode step is nothing but such products, so their bandwidth is the token rate. MLX 0.32.4 runs them
// with its matrix-vector kernel (gemms/gemv.cu): a warp a weight row, 8-byte loads, one load a lane in flight. On an
// H100 it streams the 8B step's weights at 2.2-2.6 TB/s where the card copies at 2.94 (benchmarks/README.md, session
// 21: the small q|k|v and o weights are the slowest), which holds the bf16 8B decode at 83-84 % of the roofline.
// This kernel gives a warp a weight row too, but loads 16 bytes a lane, four loads in flight before any arithmetic,
// and multiplies each loaded chunk with every row of x (up to kMaxHalfGemvRows) so that a few concurrent sequences
// read the weight once.
//
// A measuring switch: MLXRUNNER_HALF_GEMV=1 sends the decode products of half-precision weights here (nn/linear.cpp);
// off unless set. Timed in session 22 (H100, benchmarks/README.md): `matvec_bench --half` has it faster than MLX's at
// most of the 8B's weights (the step's products 5.37 against 5.85 ms), but that bench read one weight over and over,
// which then came partly from the 50 MB L2 (this kernel ran the 117 MB down projection at 3.55 TB/s, above the card's
// copy rate). Inside a real decode step the profile has this kernel slower at every weight (q|k|v 19.0 against 17.9 us,
// o 13.9 / 12.7, gate|up 77.2 / 75.7, down 43.4 / 40.0; 5.29 against 5.02 ms a token), and llm_bench's 8B decode falls
// from 163 to 156 tok/s with every product here, to 158 with only the long rows' (K >= 12,288). So it stays off.
#pragma once

#include <optional>

#include "nn/weights.h"

namespace mlxr {

// The most rows of x one launch takes: each lane holds a float sum a row.
constexpr int kMaxHalfGemvRows = 4;

// x W^T for W [N, K] and x [..., K] in one half-precision dtype, K a multiple of 8, at most kMaxHalfGemvRows rows of
// x: float sums rounded once to x's dtype. nullopt when not on CUDA or the case is not one of those.
std::optional<mx::array> cuda_half_gemv(const mx::array& x, const mx::array& w);

// Whether MLXRUNNER_HALF_GEMV=1 (read once): the Linear layers' float products then try cuda_half_gemv first.
bool half_gemv_switched_on();

}  // namespace mlxr
