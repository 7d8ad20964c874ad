// nn/cpu_kernel_loops.inc for AVX2 + FMA: CMakeLists.txt compiles this file with -mavx2 -mfma on x86-64, and
// nn/cpu_kernels.cpp calls these loops only where the CPU has both.
#include "nn/cpu_kernel_loops.h"

#ifdef MLXR_AVX2_LOOPS
#include <immintrin.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "nn/erf_coefficients.h"

namespace mlxr::cpu_loops::avx2 {
#include "nn/cpu_kernel_loops.inc"
}  // namespace mlxr::cpu_loops::avx2
#endif
