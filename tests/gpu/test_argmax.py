"""Greedy sampling's argmax kernel (nn/cuda_argmax.h) against mx.argmax.

On CUDA `_core.cuda_argmax` must give mx.argmax's index (as int32) for a vocabulary's logits and for each row of a
batch's: the first index of the largest value (ties), a row's maximum at its first or last element, rows whose start
is not 16-byte aligned (a slice), rows shorter than a word, -inf everywhere, NaNs (larger than any number: the first
NaN's index, as MLX and numpy answer). Off CUDA it declines (None) and the sampler keeps MLX's argmax. The decoders'
greedy texts with it on are checked by the GPU runs of tests/gpu/test_decode_attention.py and the parity tests.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()


def expected(z: mx.array) -> mx.array:
    return mx.argmax(z, axis=-1).astype(mx.int32)


def logits(shape, dtype, seed: int) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype) * 4


CASES = [  # (shape, dtype)
    ((151_936,), mx.bfloat16),  # Qwen3's vocabulary
    ((128_256,), mx.float32),  # Llama 3's, as the sampler's float32 after a bias
    ((32_000,), mx.float16),
    ((7,), mx.bfloat16),  # shorter than a 16-byte word
    ((4, 151_936), mx.bfloat16),  # a batch's rows
    ((3, 1_001), mx.float32),  # rows whose starts fall off the 16-byte boundaries
]


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_argmax_is_mlx_argmax(shape, dtype):
    z = logits(shape, dtype, sum(shape))
    got = _core.cuda_argmax(z)
    if not ON_CUDA:
        assert got is None
        return
    assert got.dtype == mx.int32 and got.shape == shape[:-1]
    assert mx.array_equal(got, expected(z))


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on CUDA only (off CUDA it declines: tested above)")
def test_ties_edges_offsets_and_nans():
    v = 50_003
    base = np.random.default_rng(0).standard_normal((6, v)).astype(np.float32)
    base[0, [17, 40_000, 50_002]] = 9.0  # a tie: the first index wins
    base[1, 0] = 9.0  # the first element
    base[2, v - 1] = 9.0  # the last element (past the last whole word)
    base[3, :] = -np.inf  # nothing but -inf: index 0
    base[4, 12_345] = np.nan  # the first NaN wins over any number
    base[4, [12_346, 40_000]] = [9.0, np.nan]
    base[5, :] = np.nan  # a row of NaNs: 0
    for dtype in (mx.float32, mx.bfloat16):
        z = mx.array(base).astype(dtype)
        got = _core.cuda_argmax(z)
        assert mx.array_equal(got, expected(z)), dtype
        assert got.tolist() == [17, 0, v - 1, 0, 12_345, 0]
        assert mx.argmax(z[4]).item() == 12_345  # MLX's own answer, which the kernel follows
        for start in (1, 3, 5):  # a view whose rows start 2, 6, 10 bytes past a boundary
            view = z[:, start:]
            assert mx.array_equal(_core.cuda_argmax(view), expected(view)), (dtype, start)
        for row in range(6):  # a single vocabulary, as the sampler passes it
            assert _core.cuda_argmax(z[row]).item() == expected(z[row]).item()
