"""The diffusion transformers' fused CUDA kernels (nn/cuda_dit_fusion) against MLX's own operations.

- Per-head RMSNorm + RoPE by a table of angles (`_core.cuda_head_norm_rope_pairs`), Z-Image's and FLUX.2's queries
  and keys: rms_norm head by head, then each adjacent pair rotated by its token's cos/sin, read through any strides
  (FLUX.2's single blocks read q and k in place from a wider projection, its double blocks a range of the table).
- A modulated block's input, rms_norm(x) * scale (`_core.cuda_scaled_rms_norm`).
- The sandwich-normed gated residual x + gate * rms_norm(a), and the next modulated norm of that sum
  (`_core.cuda_gated_residual`).
On CUDA each must equal the composed MLX operations up to one rounding step of the dtype (only the order of a
norm's sum of squares differs); off CUDA each declines (None), and so does CUDA outside the case it handles.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()
TOLERANCE = {mx.float32: 1e-5, mx.bfloat16: 1.6e-2, mx.float16: 2e-3}


def relative_error(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def rope_table(batch: int, tokens: int, half: int, seed: int) -> tuple[mx.array, mx.array]:
    angles = 40.0 * mx.random.uniform(shape=(batch, tokens, 1, half), key=mx.random.key(seed))
    return mx.cos(angles), mx.sin(angles)


def composed_norm_rope(x, cos, sin, weight, eps):
    """mx.fast.rms_norm per head, then every adjacent pair (2i, 2i + 1) rotated: x [B, T, H, D]."""
    if weight is not None:
        x = mx.fast.rms_norm(x, weight, eps)
    pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize(("batch", "tokens", "heads", "d", "table_batch"),
                         [(1, 37, 30, 128, 1), (2, 16, 4, 128, 2), (1, 5, 3, 64, 1), (2, 3, 2, 256, 1)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_head_norm_rope_matches_mlx(dtype, batch, tokens, heads, d, table_batch, with_norm):
    keys = mx.random.split(mx.random.key(d + tokens), 2)
    x = (3 * mx.random.normal((batch, tokens, heads, d), key=keys[0])).astype(dtype)
    weight = (1 + 0.1 * mx.random.normal((d,), key=keys[1])).astype(dtype) if with_norm else None
    cos, sin = rope_table(table_batch, tokens, d // 2, seed=tokens)
    got = _core.cuda_head_norm_rope_pairs(x, cos, sin, weight, 1e-5)
    if not ON_CUDA:
        assert got is None
        return
    assert got.shape == x.shape and got.dtype == dtype
    assert relative_error(got, composed_norm_rope(x, cos, sin, weight, 1e-5)) <= TOLERANCE[dtype]


@pytest.mark.skipif(not ON_CUDA, reason="reads through strides on CUDA only; off CUDA every call declines (above)")
def test_head_norm_rope_reads_strided_heads_and_table_rows():
    """q as the first third of a q|k|v projection, the table's rows from an offset: no copies needed."""
    batch, tokens, heads, d, first = 2, 11, 4, 128, 7
    qkv = mx.random.normal((batch, tokens, 3 * heads * d), key=mx.random.key(3)).astype(mx.bfloat16)
    q = qkv[:, :, : heads * d].reshape(batch, tokens, heads, d)
    weight = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(4))).astype(mx.bfloat16)
    cos, sin = rope_table(1, first + tokens + 3, d // 2, seed=5)
    rows = slice(first, first + tokens)
    got = _core.cuda_head_norm_rope_pairs(q, cos[:, rows], sin[:, rows], weight, 1e-6)
    expected = composed_norm_rope(mx.contiguous(q), mx.contiguous(cos[:, rows]), mx.contiguous(sin[:, rows]),
                                  weight, 1e-6)
    assert relative_error(got, expected) <= TOLERANCE[mx.bfloat16]


def test_head_norm_rope_declines_what_it_does_not_do():
    """Heads not a multiple of 64 wide, or a table of the wrong length, take MLX's operations."""
    cos, sin = rope_table(1, 4, 48, seed=1)
    assert _core.cuda_head_norm_rope_pairs(mx.zeros((1, 4, 2, 96), dtype=mx.bfloat16), cos, sin) is None
    cos, sin = rope_table(1, 3, 64, seed=1)
    assert _core.cuda_head_norm_rope_pairs(mx.zeros((1, 4, 2, 128), dtype=mx.bfloat16), cos, sin) is None


def modulation_inputs(dtype, batch, tokens, n, seed):
    keys = mx.random.split(mx.random.key(seed), 6)
    x = (4 * mx.random.normal((batch, tokens, n), key=keys[0])).astype(dtype)
    a = (2 * mx.random.normal((batch, tokens, n), key=keys[1])).astype(dtype)
    weights = [(1 + 0.1 * mx.random.normal((n,), key=k)).astype(dtype) for k in keys[2:4]]
    per_sample = [(1 + 0.5 * mx.random.normal((batch, 1, n), key=k)).astype(dtype) for k in keys[4:6]]
    return x, a, weights, per_sample


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize(("batch", "tokens", "n"), [(1, 4128, 3840), (2, 33, 3840), (1, 7, 100), (2, 3, 9000)])
def test_scaled_rms_norm_matches_mlx(dtype, batch, tokens, n):
    x, _, (weight, _), (scale, _) = modulation_inputs(dtype, batch, tokens, n, seed=n + tokens)
    got = _core.cuda_scaled_rms_norm(x, weight, 1e-5, scale)
    if not ON_CUDA:
        assert got is None
        return
    assert got.shape == x.shape and got.dtype == dtype
    assert relative_error(got, mx.fast.rms_norm(x, weight, 1e-5) * scale) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize(("batch", "tokens", "n"), [(1, 4128, 3840), (2, 33, 3840), (1, 7, 100)])
@pytest.mark.parametrize("with_next", [True, False])
def test_gated_residual_matches_mlx(dtype, batch, tokens, n, with_next):
    x, a, (a_weight, next_weight), (gate, next_scale) = modulation_inputs(dtype, batch, tokens, n, seed=tokens)
    got = _core.cuda_gated_residual(x, a, a_weight, 1e-5, mx.tanh(gate),
                                    next_weight if with_next else None, 1e-6, next_scale if with_next else None)
    if not ON_CUDA:
        assert got is None
        return
    h, following = got
    expected_h = x + mx.tanh(gate) * mx.fast.rms_norm(a, a_weight, 1e-5)
    assert h.dtype == dtype
    assert relative_error(h, expected_h) <= TOLERANCE[dtype]
    if not with_next:
        assert following is None
        return
    # From our h, so that a rounding step in h does not count twice.
    assert relative_error(following, mx.fast.rms_norm(h, next_weight, 1e-6) * next_scale) <= TOLERANCE[dtype]


def test_modulation_kernels_decline_mixed_dtypes():
    x, a, (weight, _), (scale, _) = modulation_inputs(mx.bfloat16, 1, 3, 64, seed=2)
    assert _core.cuda_scaled_rms_norm(x, weight.astype(mx.float32), 1e-5, scale) is None
    assert _core.cuda_gated_residual(x.astype(mx.float32), a, weight, 1e-5, scale) is None


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize(("batch", "tokens", "n"), [(1, 4608, 3072), (2, 33, 3072), (1, 7, 100)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_modulated_layer_norm_matches_mlx(dtype, batch, tokens, n, with_residual):
    """FLUX.2's (1 + scale) * layer_norm(x) + shift, its vectors ranges of one modulation output (strided)."""
    x, y, _, _ = modulation_inputs(dtype, batch, tokens, n, seed=tokens + 1)
    mod = (0.5 * mx.random.normal((batch, 1, 3 * n), key=mx.random.key(9))).astype(dtype)
    shift, scale, gate = mx.split(mod, 3, axis=-1)
    one_plus_scale = 1 + scale
    residual = {"y": y, "gate": gate} if with_residual else {}
    got = _core.cuda_modulated_layer_norm(x, shift, one_plus_scale, 1e-6, **residual)
    if not ON_CUDA:
        assert got is None
        return
    h, out = got
    expected_h = x + gate * y if with_residual else x
    assert relative_error(h, expected_h) <= TOLERANCE[dtype]
    expected = one_plus_scale * mx.fast.layer_norm(h, None, None, 1e-6) + shift
    assert out.dtype == dtype
    assert relative_error(out, expected) <= TOLERANCE[dtype]
