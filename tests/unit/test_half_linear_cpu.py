"""A bfloat16 or float16 Linear on the CPU (nn/linear.cpp's float_matmul), where MLX 0.32 has no BLAS path for half
precision: below kCpuHalfKernelRows rows our multi-core kernel (nn/cpu_kernels.h, half_matvec_cpu) widens the weights
and sums in float, from there on a float32 copy of the weight goes through BLAS. Each must give x @ W.T of the
weights' values, in x's dtype; the tied LM head (the embedding as a linear) takes the same path."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import _core

KERNEL_BELOW_ROWS = 32  # kCpuHalfKernelRows


pytestmark = pytest.mark.usefixtures("on_cpu")


def exact_product(x: mx.array, weight: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64) @ np.array(weight.astype(mx.float32), dtype=np.float64).T


@pytest.mark.parametrize("rows", [1, 3, 9, KERNEL_BELOW_ROWS - 1, KERNEL_BELOW_ROWS, 70])
@pytest.mark.parametrize("k", [24, 64, 200])  # 24 and 200: a last step of 8 after the steps of 16
@pytest.mark.parametrize("x_dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("weight_dtype", [mx.bfloat16, mx.float16])
def test_half_weight_products(rows, k, x_dtype, weight_dtype):
    mx.random.seed(rows * 1000 + k)
    weight = mx.random.normal((45, k)).astype(weight_dtype)
    x = mx.random.normal((2, rows, k)).astype(x_dtype)
    got = _core.linear(x, weight)
    assert got.dtype == x_dtype and got.shape == (2, rows, 45)
    want = exact_product(x.reshape(-1, k), weight).reshape(2, rows, 45)
    got = np.array(got.astype(mx.float32))
    scale = np.abs(want).max()
    if x_dtype == mx.float32:  # float sums of exact products: only the order of the terms differs
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    else:  # the float result rounded once to x's dtype (8 significant bits in bfloat16, 11 in float16)
        ulp = 2.0 ** -8 if x_dtype == mx.bfloat16 else 2.0 ** -11
        assert np.all(np.abs(got - want) <= ulp * np.abs(want) + 1e-5 * scale)


def test_a_bias_is_added_after_the_product():
    weight = mx.random.normal((16, 32)).astype(mx.bfloat16)
    bias = mx.random.normal((16,)).astype(mx.bfloat16)
    x = mx.random.normal((1, 32))
    got = np.array(_core.linear(x, weight, bias))
    want = exact_product(x, weight) + np.array(bias.astype(mx.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_an_odd_width_keeps_mlx_product():
    """K not a multiple of 8: MLX's own (bfloat16) product, the same values within its rounding."""
    weight = mx.random.normal((10, 13)).astype(mx.bfloat16)
    x = mx.random.normal((3, 13)).astype(mx.bfloat16)
    got = np.array(_core.linear(x, weight).astype(mx.float32))
    np.testing.assert_allclose(got, exact_product(x, weight), rtol=2e-2, atol=2e-2)
