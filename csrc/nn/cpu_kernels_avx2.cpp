// nn/cpu_kernel_loops.inc for AVX2 + FMA (+ F16C, float16 widening): CMakeLists.txt compiles this file with -mavx2
// -mfma -mf16c on x86-64, and nn/cpu_kernels.cpp calls these loops only where the CPU has all three (every AVX2 CPU
// has F16C).
#include "nn/cpu_kernel_loops.h"

#ifdef MLXR_AVX2_LOOPS
#include "nn/cpu_kernel_loops_includes.h"

namespace mlxr::cpu_loops::avx2 {
#define MLXR_LOOPS_NAME "avx2"
#include "nn/cpu_kernel_loops.inc"
#undef MLXR_LOOPS_NAME
}  // namespace mlxr::cpu_loops::avx2
#endif
