// The coefficients of the exact GELU's erf (nn/activation.h), on their own: nn/cpu_kernels_avx2.cpp needs them
// without MLX's headers.
#pragma once

#include <array>

namespace mlxr {

// erf(x) as Eigen's float approximation: x * P(x^2) / Q(x^2) on [-4, 4] (beyond it erf is +-1 in
// float32), max error ~1e-7; the coefficients from the highest power down.
inline constexpr std::array<double, 7> kErfNumerator{
    -2.72614225801306e-10, 2.77068142495902e-08,  -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02};
inline constexpr std::array<double, 5> kErfDenominator{
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02};

}  // namespace mlxr
