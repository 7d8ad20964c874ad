"""Linear::outputs (nn/linear.h): a layer computing only its output features [begin, end), from views of those rows of
its weight, bias, scales and biases. FLUX.2's last single block multiplies its fused q|k|v|MLP projection that way (the
keys and values for every row, the queries and the MLP for the image rows it keeps). Each range must give the columns
the whole layer gives, float or packed, in any mode; a range outside the layer is refused."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import _core

RANGES = [(0, 40), (40, 96), (17, 18), (0, 96)]
MODES = [("affine", 4, 64), ("affine", 8, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16)]

pytestmark = pytest.mark.usefixtures("on_cpu")


@pytest.mark.parametrize(("begin", "end"), RANGES)
@pytest.mark.parametrize("rows", [1, 5, 70])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_a_float_layers_output_range_is_those_columns_of_its_product(begin, end, rows, dtype):
    key = mx.random.key(rows * 100 + begin)
    weight = mx.random.normal((96, 128), key=key).astype(dtype)
    bias = mx.random.normal((96,), key=mx.random.split(key)[1]).astype(dtype)
    x = mx.random.normal((2, rows, 128), key=mx.random.split(key)[0]).astype(dtype)
    whole = _core.linear(x, weight, bias)
    part = _core.linear(x, weight, bias, outputs=(begin, end))
    assert part.shape == (2, rows, end - begin) and part.dtype == dtype
    # Each output column is its own dot product over the same terms; BLAS may add them in another order for another
    # width (a single column is a matrix-vector product), so float32 agrees to its rounding, bfloat16 (float sums
    # rounded once) to the last bit.
    want = np.array(whole[..., begin:end].astype(mx.float32))
    got = np.array(part.astype(mx.float32))
    if dtype == mx.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    else:
        np.testing.assert_allclose(got, want, rtol=2.0 ** -8, atol=2.0 ** -8 * np.abs(want).max())


@pytest.mark.parametrize(("mode", "bits", "group"), MODES)
@pytest.mark.parametrize(("begin", "end"), RANGES)
@pytest.mark.parametrize("rows", [1, 70])
def test_a_packed_layers_output_range_is_those_columns_of_its_product(mode, bits, group, begin, end, rows):
    key = mx.random.key(rows * 7 + bits + begin)
    weight = mx.random.normal((96, 128), key=key)
    packed, scales, *biases = mx.quantize(weight, group_size=group, bits=bits, mode=mode)
    bias = biases[0] if biases else None
    spec = _core.QuantSpec.from_dict({"bits": bits, "group_size": group, "mode": mode})
    x = mx.random.normal((rows, 128), key=mx.random.split(key)[0])
    whole = _core.quantized_linear(x, packed, scales, bias, spec)
    part = _core.quantized_linear(x, packed, scales, bias, spec, outputs=(begin, end))
    assert part.shape == (rows, end - begin)
    np.testing.assert_allclose(np.array(part), np.array(whole[:, begin:end]), rtol=1e-5, atol=1e-5)
    exact = mx.dequantize(packed, scales, bias, group_size=group, bits=bits, mode=mode)[begin:end]
    np.testing.assert_allclose(np.array(part), np.array(x @ exact.T), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("begin", "end"), [(-1, 4), (0, 97), (5, 5), (9, 3)])
def test_a_range_outside_the_layer_is_refused_with_its_bounds(begin, end):
    weight = mx.zeros((96, 16))
    with pytest.raises(ValueError, match=rf"\[{begin}, {end}\) is not a range of the layer's 96 outputs"):
        _core.linear(mx.zeros((1, 16)), weight, outputs=(begin, end))
