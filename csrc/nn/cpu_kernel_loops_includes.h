// What nn/cpu_kernel_loops.inc uses, included by each file that compiles it for an instruction set
// (nn/cpu_kernels_avx2.cpp, nn/cpu_kernels_avx512.cpp) before the namespace the loops go in.
#pragma once

#include <immintrin.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "nn/erf_coefficients.h"
