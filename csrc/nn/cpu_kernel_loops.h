// The vectorisable inner loops of nn/cpu_kernels.cpp, compiled from nn/cpu_kernel_loops.inc: for the x86-64
// baseline (or any other CPU) and, on x86-64, for AVX2 + FMA (nn/cpu_kernels_avx2.cpp: 8 floats a step, fma in
// hardware) and for AVX-512 (nn/cpu_kernels_avx512.cpp: the convolution 16 floats a step, twice AVX2's multiply-adds
// a cycle on CPUs with two 512-bit FMA units). cpu_kernels.cpp picks one at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlxr::cpu_loops {

// Rows that group_max and group_sum take at a time.
constexpr std::size_t kRowGroup = 8;
// A convolution block: Loops::conv_pixels output pixels of one row x conv_panels panels of kConvOutputs output
// channels, its sums in registers: 6 pixels x 1 panel (2 x 8 floats each) with AVX2, 8 pixels x 2 panels (16 floats
// each) with AVX-512.
constexpr int kConvOutputs = 16;

struct Loops {
  float (*row_max)(const float* in, int n);
  void (*group_max)(const float* in, int n, std::size_t stride, float* maxes);  // kRowGroup rows
  void (*group_sum)(const float* in, int n, std::size_t stride, float* sums);   // kRowGroup rows, in index order
  void (*exp_shifted)(const float* in, float* out, int n, float shift);         // out = MLX's exp(in - shift)
  void (*scale_row)(float* out, int n, float factor);
  void (*gelu_range)(const float* in, float* out, std::size_t n);
  void (*silu_range)(const float* in, const float* up, float* out, std::size_t n);  // up: nullptr or gated
  void (*channel_sums)(const float* in, std::size_t pixels, int channels, const float* centre, double* sums);
  void (*normalise_rows)(const float* in, float* out, std::size_t pixels, int channels, const float* mean,
                         const float* scale, const float* shift, bool silu);
  // bias: nullptr for RMSNorm
  void (*norm_row)(const float* in, float* out, int n, const float* weight, const float* bias, float eps,
                   float inverse_n);
  void (*norm_group)(const float* in, float* out, int n, const float* weight, const float* bias, float eps,
                     float inverse_n);  // norm_row over kRowGroup rows
  // conv_pixels x (conv_panels x kConvOutputs) outputs of a stride-1 convolution: rows[ky] is the zero-padded input
  // row of tap row ky at the block's first pixel ([pixels, channels]), panel the weights of the block's first 16
  // outputs [kernel, kernel, channels, kConvOutputs] (the next panel's panel_stride floats on), out the block's first
  // output (pixels out_stride apart). Only with AVX2 + FMA or AVX-512: nullptr in the baseline loops, whose CPUs keep
  // the im2col-and-sgemm convolution.
  void (*conv_block)(const float* const* rows, int kernel, int channels, const float* panel, std::size_t panel_stride,
                     float* out, int out_stride);
  // conv_block over one panel (the last 16 outputs where the panels are odd in number); conv_block itself where that
  // takes one panel.
  void (*conv_block_one_panel)(const float* const* rows, int kernel, int channels, const float* panel,
                               std::size_t panel_stride, float* out, int out_stride);
  int conv_pixels;  // the output pixels conv_block takes
  int conv_panels;  // the panels of kConvOutputs channels it takes
  // One output of a packed affine product (4- or 8-bit): sum over the row's `groups` groups of `group_size` (a
  // multiple of 8) of scale * (q . x) + bias * x_sums[g]; w is the output's row of packed words.
  float (*affine_dot_4bit)(const std::uint32_t* w, const float* scales, const float* biases, const float* x,
                           const float* x_sums, int groups, int group_size);
  float (*affine_dot_8bit)(const std::uint32_t* w, const float* scales, const float* biases, const float* x,
                           const float* x_sums, int groups, int group_size);
  // A bfloat16 / float16 weight row (its bits) widened to float; k a multiple of 8.
  void (*bf16_widen)(const std::uint16_t* w, float* out, int k);
  void (*f16_widen)(const std::uint16_t* w, float* out, int k);
  // sum of a[i] b[i] over k, a multiple of 8.
  float (*dot)(const float* a, const float* b, int k);
  // The largest of n floats (no NaN), in vector lanes: the same value as row_max, without its one-compare chain.
  float (*wide_max)(const float* in, int n);
  // out = MLX's exp(in - shift), returning the sum of out summed in vector lanes (not MLX's index order).
  float (*exp_shifted_sum)(const float* in, float* out, int n, float shift);
  const char* name;  // "baseline", "avx2" or "avx512"
};

namespace baseline {
extern const Loops loops;
}

#if defined(__x86_64__) && !defined(_MSC_VER)
#define MLXR_AVX2_LOOPS 1
namespace avx2 {
extern const Loops loops;
}
namespace avx512 {
extern const Loops loops;
}
#endif

}  // namespace mlxr::cpu_loops
