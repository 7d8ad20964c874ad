"""A packed Linear on the CPU: the dequantized weight's product from nn/linear.cpp's kCpuDequantizedRows on (MLX's
CPU kernel runs a row at a time on one thread: 30x slower at 256 rows), MLX's quantized_matmul below; affine 4/8-bit
weights take our kernel (nn/cpu_kernels.h, affine_matvec_cpu) below kCpuAffineKernelRows instead. Each must give
x @ dequantize(W).T, in every mode MLX has."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import _core

DEQUANTIZED_FROM_ROWS = 4  # kCpuDequantizedRows
OURS_BELOW_ROWS = 32  # kCpuAffineKernelRows
MODES = [("affine", 4, 64), ("affine", 8, 32), ("affine", 3, 64), ("mxfp4", 4, 32), ("nvfp4", 4, 16),
         ("mxfp8", 8, 32)]


pytestmark = pytest.mark.usefixtures("on_cpu")


@pytest.mark.parametrize(("mode", "bits", "group"), MODES)
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 31, 32, 64, 300])
def test_a_packed_linear_is_x_times_the_dequantized_weight(mode, bits, group, rows):
    key = mx.random.key(rows * 31 + bits)
    weight = mx.random.normal((96, 128), key=key)
    packed, scales, *biases = mx.quantize(weight, group_size=group, bits=bits, mode=mode)
    bias = biases[0] if biases else None
    exact = mx.dequantize(packed, scales, bias, group_size=group, bits=bits, mode=mode).astype(mx.float32)
    x = mx.random.normal((rows, 128), key=mx.random.split(key)[0])
    spec = _core.QuantSpec.from_dict({"bits": bits, "group_size": group, "mode": mode})
    got = _core.quantized_linear(x, packed, scales, bias, spec)
    assert got.shape == (rows, 96) and got.dtype == mx.float32
    ours = mode == "affine" and bits in (4, 8) and rows < OURS_BELOW_ROWS
    if ours:  # our kernel: its own order of the float sums
        np.testing.assert_allclose(np.array(got), np.array(x @ exact.T), rtol=1e-5, atol=1e-4)
    elif rows >= DEQUANTIZED_FROM_ROWS:  # the dequantized weight's product: the same operations as the reference
        assert mx.array_equal(got, x @ exact.T)
    else:  # MLX's kernel: its own order of the float sums
        np.testing.assert_allclose(np.array(got), np.array(x @ exact.T), rtol=1e-5, atol=1e-4)
        assert mx.array_equal(got, mx.quantized_matmul(x, packed, scales, bias, True, group, bits, mode))


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
def test_our_cpu_kernel_on_a_wide_layer_over_both_cores(bits, group):
    """Enough outputs that the kernel splits them over the cores, a row of x that is a strided view, and the
    leading axes of a decode step's input [batch, 1, K]; float64 reference."""
    key = mx.random.key(bits * 1000 + group)
    weight = mx.random.normal((1000, 512), key=key)
    packed, scales, bias = mx.quantize(weight, group_size=group, bits=bits)
    spec = _core.QuantSpec.from_dict({"bits": bits, "group_size": group, "mode": "affine"})
    x = mx.random.normal((512, 3), key=mx.random.split(key)[0]).T.reshape(3, 1, 512)  # not row-contiguous
    got = _core.quantized_linear(x, packed, scales, bias, spec)
    exact = np.array(mx.dequantize(packed, scales, bias, group_size=group, bits=bits)).astype(np.float64)
    want = np.array(x).astype(np.float64) @ exact.T
    assert got.shape == (3, 1, 1000)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("mode", "bits", "group"), [("affine", 4, 64), ("affine", 8, 32), ("mxfp4", 4, 32)])
@pytest.mark.parametrize("layout", ["tokens x experts", "one row a pair", "sorted"])
def test_a_moe_expert_product_is_gather_qmm(mode, bits, group, layout):
    """The routed experts' product (nn/moe.cpp's SwitchLinear) in the three shapes SwitchGLU gives it: each token's
    row against its k experts, one row per (token, expert) (the down projection), and rows sorted by expert. Affine
    4/8-bit weights take our kernel on the CPU (its own order of the float sums), other modes MLX's gather_qmm."""
    experts, n, k_in, tokens, top = 6, 40, 128, 5, 2
    key = mx.random.key(bits + group)
    stacked = mx.random.normal((experts, n, k_in), key=key)
    packed, scales, *biases = mx.quantize(stacked, group_size=group, bits=bits, mode=mode)
    bias = biases[0] if biases else None
    indices = mx.random.randint(0, experts, (tokens, top), key=mx.random.split(key)[0]).astype(mx.uint32)
    sorted_ = layout == "sorted"
    shapes = {"tokens x experts": (tokens, 1, 1, k_in), "one row a pair": (tokens, top, 1, k_in),
              "sorted": (tokens * top, 1, k_in)}
    x = mx.random.normal(shapes[layout], key=mx.random.split(key)[1])
    if sorted_:
        indices = mx.sort(mx.flatten(indices))
    spec = _core.QuantSpec.from_dict({"bits": bits, "group_size": group, "mode": mode})
    got = _core.quantized_switch_linear(x, packed, scales, bias, indices, spec, sorted_)
    want = mx.gather_qmm(x, packed, scales, bias, rhs_indices=indices, transpose=True, group_size=group, bits=bits,
                         mode=mode, sorted_indices=sorted_)
    assert got.shape == want.shape and got.dtype == mx.float32
    exact = mx.dequantize(packed, scales, bias, group_size=group, bits=bits, mode=mode)
    reference = mx.gather_mm(x, mx.swapaxes(exact, -1, -2), rhs_indices=indices, sorted_indices=sorted_)
    np.testing.assert_allclose(np.array(got), np.array(reference), rtol=1e-5, atol=1e-4)
    if mode != "affine":
        assert mx.array_equal(got, want)
