"""Half-precision attention on the CPU (nn/attention.cpp): it runs in float32 on our kernels and rounds its output
once to bfloat16/float16. It must give softmax(q k^T / sqrt(d)) v of the inputs' values within that rounding (one
query and many, causal, grouped heads, a sliding window, a padding mask)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import _core

pytestmark = pytest.mark.usefixtures("on_cpu")


def reference(q, k, v, allowed) -> np.ndarray:
    q, k, v = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (q, k, v))
    repeats = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, repeats, axis=1), np.repeat(v, repeats, axis=1)
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def causal(queries: int, keys: int, window: int = 0) -> np.ndarray:
    position = np.arange(keys - queries, keys)[:, None]
    key = np.arange(keys)[None, :]
    allowed = key <= position
    return allowed & (key > position - window) if window else allowed


def within_rounding(got: mx.array, want: np.ndarray, dtype, slack: float = 1e-3) -> None:
    """The float result rounded once to `dtype` (slack: of the largest output, for the float sums' order)."""
    ulp = 2.0 ** -8 if dtype == mx.bfloat16 else 2.0 ** -11
    got = np.array(got.astype(mx.float32))
    assert np.all(np.abs(got - want) <= ulp * np.abs(want) + slack * np.abs(want).max())


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize(("queries", "keys", "window"), [(1, 37, 0), (24, 24, 0), (9, 40, 0), (30, 30, 8)])
def test_causal_half_attention(dtype, queries, keys, window):
    mx.random.seed(queries * 100 + keys)
    q = mx.random.normal((1, 8, queries, 64)).astype(dtype)
    k, v = (mx.random.normal((1, 2, keys, 64)).astype(dtype) for _ in range(2))
    got = _core.attention(q, k, v, window=window)
    assert got.dtype == dtype
    within_rounding(got, reference(q, k, v, causal(queries, keys, window)), dtype)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_attention_under_a_padding_mask(dtype):
    q, k, v = (mx.random.normal((2, 4, 16, 32)).astype(dtype) for _ in range(3))
    keys_allowed = np.ones((2, 16), dtype=bool)
    keys_allowed[1, 11:] = False  # the second prompt's last 5 keys are padding
    mask = mx.array(keys_allowed[:, None, None, :])
    got = _core.masked_attention(q, k, v, mask)
    assert got.dtype == dtype
    within_rounding(got, reference(q, k, v, keys_allowed[:, None, None, :]), dtype)
