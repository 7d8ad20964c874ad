// A CUDA snippet shared by the fused kernels (nn/cuda_norm_rope, nn/cuda_dit_fusion): the sum of a float every
// thread of a block holds, given to every thread. blockDim.x a multiple of 32, at most 1,024; every thread of the
// block calls it. It may be called more than once in a kernel: the second barrier keeps a later call from
// overwriting the warp sums before every thread has read them.
#pragma once

namespace mlxr {

inline constexpr const char* kCudaBlockSum = R"(
__device__ inline float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}
)";

}  // namespace mlxr
