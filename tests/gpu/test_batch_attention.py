"""The batch decode attention kernel (nn/cuda_batch_attention.h) on CUDA against MLX's own attention, row by row.

A batch step's rows have caches of different lengths in one right-padded buffer; the kernel must give each row what
MLX's fused one-query attention gives that row alone over its own keys (the slots past its position hold stale
values it must not see). Grouped queries, head dims 64 and 128, a row of one key. Off CUDA the kernel declines
(None); its arithmetic is checked on the CPU by tests/unit/test_batch_attention_kernel.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()

CASES = [  # head dim, query heads, key/value heads, each row's position, capacity
    (128, 32, 8, [0, 3, 29, 200, 255], 256),
    (64, 4, 4, [17, 5], 32),
]


@pytest.mark.skipif(ON_CUDA, reason="on CUDA the kernel runs (the test below)")
def test_the_kernel_declines_off_cuda():
    q = mx.zeros((1, 2, 1, 64), mx.bfloat16)
    kv = mx.zeros((1, 2, 8, 64), mx.bfloat16)
    assert _core.cuda_batch_decode_attention(q, kv, kv, mx.array([3], mx.int32), 0.125) is None


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on CUDA only")
@pytest.mark.parametrize("d, q_heads, kv_heads, positions, capacity", CASES)
def test_each_row_gets_what_mlx_gives_it_alone(d, q_heads, kv_heads, positions, capacity):
    mx.random.seed(d + q_heads)
    rows, scale = len(positions), d ** -0.5
    q = mx.random.normal((rows, q_heads, 1, d)).astype(mx.bfloat16)
    keys = (2 * mx.random.normal((rows, kv_heads, capacity, d))).astype(mx.bfloat16)
    values = mx.random.normal((rows, kv_heads, capacity, d)).astype(mx.bfloat16)
    got = _core.cuda_batch_decode_attention(q, keys, values, mx.array(positions, mx.int32), scale)
    assert got is not None and got.shape == (rows, 1, q_heads * d)
    for b, position in enumerate(positions):
        alone = mx.fast.scaled_dot_product_attention(q[b:b + 1], keys[b:b + 1, :, : position + 1],
                                                     values[b:b + 1, :, : position + 1], scale=scale)
        want = np.array(alone.astype(mx.float32)).reshape(-1)
        have = np.array(got[b, 0].astype(mx.float32))
        np.testing.assert_allclose(have, want, rtol=2 ** -6, atol=2 ** -6 * np.abs(want).max())
