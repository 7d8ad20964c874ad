"""The VAE's GroupNorm (+ SiLU) at the VAE's shapes, in bfloat16, against GroupNorm in float64 on the same inputs.

On CUDA `_core.group_norm` runs our two kernels (nn/cuda_group_norm: per-chunk shifted sums, then one normalise
pass); elsewhere MLX's operations or the CPU's kernel. Either way the result must be GroupNorm to the output's
bfloat16 rounding: at 128 channels over 196,608 pixels (384 chunks of sums), at 512 channels, for two images in a
batch, and for activations whose mean is far from zero against their spread.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from image_helpers import group_norm_float64

GROUPS = 32
EPS = 1e-6


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(("shape", "offset"), [((1, 512, 384, 128), 0.0), ((2, 64, 96, 512), 0.0),
                                               ((1, 128, 128, 256), 40.0)])
def test_group_norm_is_group_norm_to_bfloat16_rounding(shape, offset, silu):
    from mlxrunner import _core

    keys = mx.random.split(mx.random.key(shape[-1] + int(offset)), 3)
    c = shape[-1]
    x = (offset + 2 * mx.random.normal(shape, key=keys[0])).astype(mx.bfloat16)
    weight = (1 + 0.2 * mx.random.normal((c,), key=keys[1])).astype(mx.bfloat16)
    bias = (0.1 * mx.random.normal((c,), key=keys[2])).astype(mx.bfloat16)
    got = _core.group_norm(x, weight, bias, GROUPS, EPS, silu)
    assert got.shape == x.shape and got.dtype == mx.bfloat16
    want = group_norm_float64(np.array(x.astype(mx.float32)), np.array(weight.astype(mx.float32)),
                              np.array(bias.astype(mx.float32)), GROUPS, EPS, silu)
    error = np.abs(np.array(got.astype(mx.float32)) - want)
    # One rounding to bfloat16 (2^-8 relative), and float32 statistics well inside it.
    assert np.all(error <= 2.0 ** -8 * np.abs(want) + 2e-3 * np.max(np.abs(want))), float(error.max())
