// nn/cpu_kernel_loops.inc for AVX-512 (with AVX2, FMA and F16C): CMakeLists.txt compiles this file with -mavx512f
// -mavx512vl -mavx2 -mfma -mf16c on x86-64, and nn/cpu_kernels.cpp calls these loops only where the CPU has AVX-512F
// and VL beside AVX2, FMA and F16C.
#include "nn/cpu_kernel_loops.h"

#ifdef MLXR_AVX2_LOOPS
#include "nn/cpu_kernel_loops_includes.h"

namespace mlxr::cpu_loops::avx512 {
#define MLXR_LOOPS_NAME "avx512"
#include "nn/cpu_kernel_loops.inc"
#undef MLXR_LOOPS_NAME
}  // namespace mlxr::cpu_loops::avx512
#endif
