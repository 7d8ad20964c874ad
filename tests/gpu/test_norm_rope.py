"""The decoder's fused CUDA kernels (nn/cuda_norm_rope) against MLX's own operations.

- The residual add + RMSNorm (`_core.add_rms_norm`): on CUDA one kernel of ours, elsewhere MLX's add and rms_norm;
  both must give MLX's x + delta exactly and its rms_norm of that to the dtype's rounding.
- The queries' and keys' per-head RMSNorms + RoPE and the value heads (`_core.cuda_qkv_heads`), read from the fused
  q|k|v projection (split into heads or as the product gives it), written heads first: on CUDA q and k must match
  mx.fast.rms_norm and mx.fast.rope head by head, for Qwen3's norms and Llama's bare heads, half-split and interleaved
  pairs, Llama 3's frequency scaling, head sizes 64-256, one offset or one per row, and v must be the value heads'
  bits; off CUDA it declines (None), and so does CUDA where the kernel does not apply.
- silu(gate) * up of a fused gate|up product's columns (`_core.gated_silu_columns`): on CUDA one kernel of ours,
  which must give the bits of MLX's compiled gated SiLU of the two column slices.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()
# Off CUDA the add runs as MLX's ops (exact); our kernel rounds each product once as MLX's does, but sums the
# squares in another order, so a normalised value may land one rounding step away.
STEP = {mx.float32: 2e-6, mx.bfloat16: 1e-2, mx.float16: 2e-3}


def relative_error(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape", [(1, 1, 2560), (3, 7, 4096), (2, 5, 100), (1, 2, 12288)])
def test_add_rms_norm_is_mlx_add_then_rms_norm(dtype, shape):
    key = mx.random.key(sum(shape))
    x, delta = (mx.random.normal(shape, key=k).astype(dtype) for k in mx.random.split(key, 2))
    weight = (1 + 0.1 * mx.random.normal((shape[-1],), key=mx.random.key(7))).astype(dtype)
    added, normed = _core.add_rms_norm(x, delta, weight, 1e-6)
    assert added.dtype == normed.dtype == dtype
    assert mx.array_equal(added, x + delta)
    expected = mx.fast.rms_norm(x + delta, weight, 1e-6)
    if ON_CUDA:
        assert relative_error(normed, expected) <= STEP[dtype]
    else:
        assert mx.array_equal(normed, expected)


def composed(qkv, q_heads, kv_heads, offsets, base, traditional, norms, freqs=None):
    """mx.fast.rms_norm per head, then mx.fast.rope per batch row: [B, T, q_heads + kv_heads, D]."""
    qk = qkv[:, :, : q_heads + kv_heads]
    if norms is not None:
        q_weight, k_weight = norms
        qk = mx.concatenate([mx.fast.rms_norm(qk[:, :, :q_heads], q_weight, 1e-6),
                             mx.fast.rms_norm(qk[:, :, q_heads:], k_weight, 1e-6)], axis=2)
    rows = []
    for b in range(qkv.shape[0]):
        heads = qk[b : b + 1].transpose(0, 2, 1, 3)  # [1, H, T, D]
        offset = int(offsets[b if offsets.size > 1 else 0].item())
        rotated = mx.fast.rope(heads, qkv.shape[-1], traditional=traditional, base=None if freqs is not None else base,
                               scale=1.0, offset=offset, freqs=freqs)
        rows.append(rotated.transpose(0, 2, 1, 3))
    return mx.concatenate(rows, axis=0)


def llama3_periods(dims: int, theta: float, factor=8.0, low=1.0, high=4.0, original=8192) -> mx.array:
    """Llama 3's scaled periods, as transformers' _compute_llama3_parameters (per pair, 1 / frequency)."""
    periods = []
    for i in range(0, dims, 2):
        period = theta ** (i / dims)
        wavelen = 2 * np.pi * period
        if wavelen > original / low:
            period *= factor
        elif wavelen > original / high:
            smooth = (original / wavelen - low) / (high - low)
            period /= (1 - smooth) / factor + smooth
        periods.append(period)
    return mx.array(np.array(periods, dtype=np.float32))


CASES = [
    # (q_heads, kv_heads, head_dim, with norms, traditional, rope_type): Qwen3-4B, Llama-3-8B, Gemma-like, small
    (32, 8, 128, True, False, "default"),
    (32, 8, 128, False, False, "llama3"),
    (8, 4, 256, True, False, "default"),
    (4, 2, 64, False, True, "default"),
]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "d", "with_norms", "traditional", "rope_type"), CASES)
@pytest.mark.parametrize(("batch", "tokens", "offsets"), [(1, 1, [517]), (3, 1, [3, 900, 41]), (2, 9, [0])])
@pytest.mark.parametrize("as_product", [False, True])
def test_qkv_heads_match_mlx(dtype, q_heads, kv_heads, d, with_norms, traditional, rope_type, batch, tokens, offsets,
                             as_product):
    theta = 1_000_000.0 if rope_type == "default" else 500_000.0
    config = _core.RopeConfig.from_dict({"rope_theta": theta, "traditional": traditional, "rope_type": rope_type,
                                         **({"factor": 8.0} if rope_type == "llama3" else {})})
    keys = mx.random.split(mx.random.key(d + batch), 3)
    qkv = mx.random.normal((batch, tokens, q_heads + 2 * kv_heads, d), key=keys[0]).astype(dtype)
    norms = None
    if with_norms:
        norms = tuple((1 + 0.1 * mx.random.normal((d,), key=k)).astype(dtype) for k in keys[1:])
    offsets = mx.array(offsets, dtype=mx.int32)
    # The heads split ([B, T, heads, D]) or the product's own rows ([B, T, heads * D]): the same kernel.
    given = qkv.reshape(batch, tokens, -1) if as_product else qkv
    got = _core.cuda_qkv_heads(given, q_heads, kv_heads, config, offsets, *(norms or (None, None)), eps=1e-6)
    if not ON_CUDA:
        assert got is None
        return
    freqs = llama3_periods(d, theta) if rope_type == "llama3" else None
    expected = composed(qkv, q_heads, kv_heads, offsets, theta, traditional, norms, freqs).transpose(0, 2, 1, 3)
    q, k, v = got
    assert v.shape == (batch, kv_heads, tokens, d) and v.dtype == dtype
    assert mx.array_equal(v, qkv[:, :, q_heads + kv_heads :].transpose(0, 2, 1, 3)).item()
    assert q.shape == (batch, q_heads, tokens, d) and k.shape == (batch, kv_heads, tokens, d)
    assert q.dtype == k.dtype == dtype
    got = mx.concatenate([q, k], axis=1)
    # Our angles come from frequencies computed in double (MLX's from exp2 in float): at positions near 1,000
    # the angles may differ by ~1e-4 radians, about a float32 output's 1e-4 and under a bfloat16 step.
    assert relative_error(got, expected) <= (3e-4 if dtype == mx.float32 else 2e-2)


@pytest.mark.parametrize(("d", "rope_type"), [(96, "default"), (128, "yarn")])
def test_qk_norm_rope_declines_what_it_does_not_do(d, rope_type):
    """Heads not a multiple of 64 wide and YaRN's scaled rotations take MLX's operations."""
    scaling = {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 4096}
    config = _core.RopeConfig.from_dict(scaling)
    qkv = mx.zeros((1, 1, 6, d), dtype=mx.bfloat16)
    assert _core.cuda_qkv_heads(qkv, 4, 1, config, mx.array([5], dtype=mx.int32)) is None


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize(("shape", "gate_at", "up_at", "width"),
                         [((64, 19456), 0, 9728, 9728), ((2, 7, 300), 0, 150, 150), ((5, 96), 40, 3, 37)])
def test_gated_silu_columns_is_mlx_compiled_gated_silu(dtype, shape, gate_at, up_at, width):
    fused = (4 * mx.random.normal(shape, key=mx.random.key(width))).astype(dtype)
    got = _core.gated_silu_columns(fused, gate_at, up_at, width)
    gate, up = fused[..., gate_at : gate_at + width], fused[..., up_at : up_at + width]
    assert got.shape == (*shape[:-1], width) and got.dtype == dtype
    assert mx.array_equal(got, _core.gated_silu(gate, up)).item()
    assert mx.array_equal(got, gate * mx.sigmoid(gate) * up).item()
