"""The short chunk's product kernel (nn/cuda_rows_product.h) on CUDA against MLX's own product.

At a Qwen3-4B layer's four shapes (q|k|v and o split over K, gate|up gated, down split over K) and a small one, for
9 to 64 rows of x in bfloat16 and float16: x @ W.T to the dtype's rounding (both sides sum in float32, in different
orders), and silu(gate) * up of the gated weight as MLX's product followed by the gated SiLU gives it. Several
products of one weight built into one graph as independent chains (a prompt and its negative encoded together) must
each be right: they share the weight's split counters, handed from one product to the next. Off CUDA, and where the
kernel does not apply, it declines (None).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()
STEP = {mx.bfloat16: 2**-7, mx.float16: 2**-10}

SHAPES = [  # (N, K, gated): W's rows and columns
    (6144, 2560, False),  # Qwen3-4B q|k|v: 96 tiles, K split in 3
    (2560, 4096, False),  # o: 40 tiles, split in 7
    (19456, 2560, True),  # gate|up: 304 gated tiles, no split
    (2560, 9728, False),  # down: split in 7
    (128, 128, False),    # a tiny model's: 2 steps of K, fewer than the pipeline's stages
]


def relative_error(got: mx.array, want: mx.array) -> float:
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def reference(x: mx.array, w: mx.array, gated: bool) -> mx.array:
    product = x @ w.T  # MLX's product, rounded to x's dtype
    if not gated:
        return product
    gate, up = mx.split(product, 2, axis=-1)
    return _core.gated_silu(gate, up)


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("n, k, gated", SHAPES)
@pytest.mark.parametrize("rows", [9, 24, 64])
def test_the_kernel_is_mlx_product(n, k, gated, rows, dtype):
    key = mx.random.key(n + k + rows)
    x = mx.random.normal((1, rows, k), key=key).astype(dtype)
    w = (mx.random.normal((n, k), key=mx.random.key(1)) * k**-0.5).astype(dtype)
    mx.eval(x, w)
    (got,) = _core.cuda_rows_products([x], [w], gated)
    want = reference(x, w, gated)
    assert got.shape == want.shape and got.dtype == dtype
    # one rounding step of the dtype apart (the gated SiLU's roundings after it: a few)
    assert relative_error(got, want) <= STEP[dtype] * (4 if gated else 2)


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel")
def test_independent_products_of_one_weight_in_one_graph():
    w = (mx.random.normal((2560, 4096), key=mx.random.key(2)) * 4096**-0.5).astype(mx.bfloat16)
    xs = [mx.random.normal((1, 32, 4096), key=mx.random.key(10 + i)).astype(mx.bfloat16) for i in range(6)]
    mx.eval(w, *xs)
    got = _core.cuda_rows_products(xs, [w] * len(xs))
    for x, y in zip(xs, got):
        assert relative_error(y, x @ w.T) <= 2 * STEP[mx.bfloat16]
    # and again with the counters the last graph handed on
    again = _core.cuda_rows_products(xs, [w] * len(xs))
    for y, z in zip(got, again):
        assert mx.array_equal(y, z)  # the same sums in the same order: the same bits


@pytest.mark.parametrize("rows, n, k, dtype", [(8, 128, 128, mx.bfloat16), (65, 128, 128, mx.bfloat16),
                                               (16, 100, 128, mx.bfloat16), (16, 128, 96, mx.bfloat16),
                                               (16, 128, 128, mx.float32)])
def test_it_declines_what_it_does_not_take(rows, n, k, dtype):
    x = mx.ones((1, rows, k), dtype=dtype)
    w = mx.ones((n, k), dtype=dtype)
    mx.eval(x, w)
    assert _core.cuda_rows_products([x], [w]) is None


@pytest.mark.skipif(ON_CUDA, reason="off CUDA")
def test_off_cuda_it_declines():
    x, w = mx.ones((1, 16, 128), dtype=mx.bfloat16), mx.ones((128, 128), dtype=mx.bfloat16)
    mx.eval(x, w)
    assert _core.cuda_rows_products([x], [w]) is None
