"""The CPU kernels (csrc/nn/cpu_kernels.*): softmax, GELU, SiLU, LayerNorm and RMSNorm on every core, vectorised,
and the attention built on that softmax must give exactly MLX's bits: mx.softmax, the op-by-op GELU graph,
mx.fast's norms and mx.fast.scaled_dot_product_attention (MLX's own CPU path), whatever the shape, mask or special
value. GroupNorm sums in double, so it is held to float64 GroupNorm instead. Attention runs head by head, each on one
core with one BLAS thread: its bits are those of MLX's own path with OpenBLAS on one thread, and of MLX's default
(every thread) wherever OpenBLAS blocks the key axis alike both ways. (The convolutions: test_core.py.)"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from image_helpers import group_norm_float64

from mlxrunner import _core

ERF_NUMERATOR = [-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                 -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02]
ERF_DENOMINATOR = [-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02]


def random(shape, scale=1.0, seed=0) -> mx.array:
    return mx.array((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32))


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def attention_matches_mlx(ours, theirs) -> bool:
    """Our CPU attention against MLX's. The baseline loops run MLX's own products and softmax: the same bits. The AVX2
    and AVX-512 loops run their block kernel (sums in another order, the softmax divided after the product): MLX's
    numbers within float32 rounding. test_attention_under_other_loops runs these tests under the other loops."""
    if _core.cpu_loops() == "baseline":
        return same_bits(ours, theirs)
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    scale = max(float(np.abs(theirs).max()), 1e-30)
    return ours.shape == theirs.shape and bool(np.all(np.abs(ours - theirs) <= 1e-5 * np.abs(theirs) + 2e-6 * scale))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7, 33), (10, 12, 200, 200), (2, 100_003), (4096, 8)])
def test_softmax_is_mlx_softmax_bit_for_bit(shape):
    x = random(shape, scale=6.0)
    assert same_bits(_core.softmax(x), mx.softmax(x, axis=-1))


def test_softmax_of_special_values_is_mlx_softmax():
    row = [0.0, -np.inf, 3.0, -100.0, 100.0, 87.9, -87.9, 88.1, -88.1, -3.4e38, 1e-30]
    x = mx.array(np.array([row, [np.inf, 0, 1] + row[3:], [np.nan] + row[1:], [-np.inf] * len(row)], np.float32))
    ours, theirs = np.asarray(_core.softmax(x)), np.asarray(mx.softmax(x, axis=-1))
    assert np.array_equal(ours, theirs, equal_nan=True)
    assert np.isnan(ours[1:]).all() and np.isfinite(ours[0]).all()  # inf and NaN rows are NaN, as MLX's


def test_softmax_of_a_strided_view_reads_it_as_laid_out():
    x = random((6, 40, 50), scale=4.0)
    view = x.transpose(0, 2, 1)[:, ::2]
    assert same_bits(_core.softmax(view), mx.softmax(view, axis=-1))


def erf_rational_graph(v: mx.array) -> mx.array:
    """nn/activation.cpp's erf as MLX ops, one rounding each."""
    x = mx.clip(v, -4.0, 4.0)
    x2 = mx.square(x)

    def horner(coefficients):
        acc = mx.array(np.float32(coefficients[0]))
        for c in coefficients[1:]:
            acc = acc * x2 + mx.array(np.float32(c))
        return acc

    return (x * horner(ERF_NUMERATOR)) / horner(ERF_DENOMINATOR)


@pytest.mark.parametrize("shape", [(7,), (2000, 1536), (3, 100_001)])
def test_gelu_is_the_op_by_op_graph_bit_for_bit(shape):
    h = random(shape, scale=3.0)
    half, root_half = mx.array(np.float32(0.5)), mx.array(np.float32(math.sqrt(0.5)))
    graph = (h * half) * (mx.array(np.float32(1.0)) + erf_rational_graph(h * root_half))
    assert same_bits(_core.gelu(h), graph)


def test_gelu_is_torch_gelu_within_float32():
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    assert np.abs(np.asarray(_core.gelu(mx.array(x))) - exact).max() < 2e-6


def sdpa(q, k, v, mask=None) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)


@pytest.mark.parametrize("heads, kv_heads", [(12, 12), (16, 8), (4, 1)])
def test_masked_attention_is_mlx_attention(heads, kv_heads):
    q, k, v = random((3, heads, 50, 32), seed=1), random((3, kv_heads, 50, 32), seed=2), random((3, kv_heads, 50, 32),
                                                                                                seed=3)
    keys_kept = mx.array(np.random.default_rng(4).random((3, 1, 1, 50)) > 0.3)
    additive = random((3, 1, 50, 50), seed=5)
    for mask in (None, keys_kept, additive):
        assert attention_matches_mlx(_core.masked_attention(q, k, v, mask), sdpa(q, k, v, mask))


@pytest.mark.parametrize("heads, queries, max_scores", [(1, 300, 300 * 64), (1, 300, 299), (4, 97, 4 * 97 * 10)])
def test_attention_in_query_bands_is_the_whole_attention(heads, queries, max_scores):
    # The VAE's attention (one head over every pixel) runs in bands of queries: each band's rows are the same
    # rows of the whole attention's, under a key mask or a mask with a row per query alike.
    q, k, v = (random((1, heads, queries, 48), seed=seed) for seed in (10, 11, 12))
    keys_kept = mx.array(np.random.default_rng(13).random((1, 1, 1, queries)) > 0.3)
    per_query = random((1, heads, queries, queries), seed=14)
    for mask in (None, keys_kept, per_query):
        np.testing.assert_allclose(_core.masked_attention(q, k, v, mask, max_scores=max_scores), sdpa(q, k, v, mask),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("queries", [1, 7, 40])
def test_causal_attention_is_mlx_attention_bit_for_bit(queries):
    q, k, v = random((2, 8, queries, 64), seed=6), random((2, 4, 40, 64), seed=7), random((2, 4, 40, 64), seed=8)
    assert same_bits(_core.attention(q, k, v), sdpa(q, k, v, "causal" if queries > 1 else None))


@pytest.mark.parametrize("shape, gate_at, up_at, width", [
    ((7, 40), 0, 20, 20),  # an LLM's gate | up
    ((2, 300, 2560), 1536, 1536 + 512, 512),  # FLUX.2's single block: [q | k | v | gate | up]
    ((3, 1, 64), 40, 8, 24),  # up before gate, one row per batch element
    ((4, 10), 3, 5, 0),
])
def test_gated_silu_of_a_fused_projections_columns_is_that_of_its_slices_bit_for_bit(shape, gate_at, up_at, width):
    fused = random(shape, scale=5.0, seed=11)
    gate, up = fused[..., gate_at:gate_at + width], fused[..., up_at:up_at + width]
    assert same_bits(_core.gated_silu_columns(fused, gate_at, up_at, width), (gate * mx.sigmoid(gate)) * up)
    with pytest.raises(ValueError, match="column ranges"):
        _core.gated_silu_columns(fused, shape[-1] - width + 1, 0, width or 1)


@pytest.mark.parametrize("shape", [(5,), (384, 512, 32), (3, 100_001)])
def test_silu_is_x_times_mlx_sigmoid_bit_for_bit(shape):
    x = random(shape, scale=10.0)
    assert same_bits(_core.silu(x), x * mx.sigmoid(x))
    up = random(shape, seed=9)
    assert same_bits(_core.gated_silu(x, up), (x * mx.sigmoid(x)) * up)


def test_silu_of_special_values_is_mlx_silu():
    x = mx.array(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 88.5, -88.5, 1e-30, -1e-30, 3.4e38], np.float32))
    assert np.array_equal(np.asarray(_core.silu(x)), np.asarray(x * mx.sigmoid(x)), equal_nan=True)


def group_norm_mlx_ops(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float) -> mx.array:
    """nn/norm.cpp's graph for the GPU, as MLX ops: per-channel float32 sums, then group statistics."""
    b, h, w, c = x.shape
    pixels = x.reshape(b, h * w, c)

    def group_mean(per_channel):
        g = mx.sum(per_channel.reshape(b, groups, c // groups), -1, keepdims=True) / (h * w * (c // groups))
        return mx.broadcast_to(g, (b, groups, c // groups)).reshape(b, 1, c)

    mean = group_mean(mx.sum(pixels, 1))
    var = group_mean(mx.sum(mx.square(pixels - mean), 1))
    return (((pixels - mean) * (mx.rsqrt(var + eps) * weight)) + bias).reshape(b, h, w, c)


@pytest.mark.parametrize("shape, groups", [((1, 1, 1, 4), 2), ((2, 7, 5, 6), 3), ((1, 64, 64, 128), 32),
                                           ((3, 33, 17, 64), 32), ((1, 256, 256, 32), 32)])
def test_group_norm_is_pytorchs_within_float32(shape, groups):
    """The CPU GroupNorm (statistics in double over every core; a fixed split, so the same on any core count) is
    the float64 GroupNorm to float32's precision, and closer to it than MLX's float32 op graph."""
    x = random(shape, scale=3.0) + 1.5  # off-centre: a sum of squares about 0 would lose the variance
    weight, bias = random(shape[-1:], seed=11), random(shape[-1:], seed=12)
    exact = group_norm_float64(np.asarray(x), np.asarray(weight), np.asarray(bias), groups, 1e-6)
    ours = np.asarray(_core.group_norm(x, weight, bias, groups, 1e-6))
    ops = np.asarray(group_norm_mlx_ops(x, weight, bias, groups, 1e-6))
    scale = np.abs(exact).max()
    assert np.abs(ours - exact).max() <= 4e-6 * scale
    assert np.abs(ours - exact).max() <= np.abs(ops - exact).max() + 1e-6 * scale


def test_group_norm_then_silu_is_silu_of_the_group_norm_bit_for_bit():
    x = random((2, 40, 24, 64), scale=2.0)
    weight, bias = random((64,), seed=13), random((64,), seed=14)
    normal = _core.group_norm(x, weight, bias, 32, 1e-6)
    assert same_bits(_core.group_norm(x, weight, bias, 32, 1e-6, then_silu=True), normal * mx.sigmoid(normal))


def test_group_norm_of_a_constant_image_is_its_bias():
    x = mx.full((1, 9, 9, 8), 3.25)
    bias = random((8,), seed=15)
    assert np.array_equal(np.asarray(_core.group_norm(x, random((8,), seed=16), bias, 4, 1e-6)),
                          np.broadcast_to(np.asarray(bias), (1, 9, 9, 8)))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (32, 200, 384), (2, 5, 1001)])
def test_layer_norm_and_rms_norm_are_mlxs_bit_for_bit(shape):
    """LayerNorm and RMSNorm on every core: exactly mx.fast's numbers on the CPU (its op-by-op graph)."""
    x = random(shape, scale=3.0) + 1.0
    weight, bias = random(shape[-1:], seed=17), random(shape[-1:], seed=18)
    assert same_bits(_core.layer_norm(x, weight, bias, 1e-12), mx.fast.layer_norm(x, weight, bias, 1e-12))
    assert same_bits(_core.layer_norm(x, weight, None, 1e-6), mx.fast.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("batch, mask_rows", [(3, 3), (3, 1), (1, 1)])
def test_attention_under_a_key_padding_mask_is_mlxs(batch, mask_rows):
    """An encoder's padding mask [B or 1, 1, 1, K] goes into the softmax's own pass instead of an mx.where."""
    q, k, v = (random((batch, 4, 37, 16), seed=seed) for seed in (19, 20, 21))
    keys_kept = np.random.default_rng(22).random((mask_rows, 1, 1, 37)) > 0.4
    keys_kept[..., 0] = True
    mask = mx.array(keys_kept)
    assert attention_matches_mlx(_core.masked_attention(q, k, v, mask), sdpa(q, k, v, mask))


@contextlib.contextmanager
def openblas_on_one_thread():
    """MLX's own products on one OpenBLAS thread, as each head of ours computes them."""
    scipy_openblas32 = pytest.importorskip("scipy_openblas32", reason="the BLAS that mlxrunner routes MLX to")
    library = ctypes.CDLL(str(next(Path(scipy_openblas32.get_lib_dir()).glob("libscipy_openblas*.so"))))
    threads = library.scipy_openblas_get_num_threads()
    library.scipy_openblas_set_num_threads(1)
    try:
        yield
    finally:
        library.scipy_openblas_set_num_threads(threads)


def heads_first_view(batch, length, heads, depth, seed) -> mx.array:
    """[B, H, L, D] as a DiT hands it over: the transposed view of its projection's [B, L, H, D] output."""
    return random((batch, length, heads, depth), seed=seed).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("batch, heads, kv_heads, length, depth, layout", [
    (1, 8, 8, 288, 64, "view"),  # the small Z-Image's joint stream at 256^2
    (1, 8, 8, 32, 64, "view"),  # its caption refiner: products for OpenBLAS's small-matrix kernels
    (1, 8, 8, 800, 64, "view"),  # at 512x384: the key axis in two blocks
    (2, 6, 2, 96, 64, "contiguous"),  # grouped heads
    (2, 1, 1, 1024, 128, "contiguous"),  # a VAE's one head, two images
    (1, 2, 2, 333, 64, "view"),  # an odd length
])
def test_attention_head_by_head_is_mlxs(batch, heads, kv_heads, length, depth, layout):
    """The DiTs' and VAEs' attention (no mask or a key padding mask) runs each head on one core: exactly
    mx.fast.scaled_dot_product_attention's numbers, heads-first views read in place."""
    if layout == "view":
        q, k, v = (heads_first_view(batch, length, h, depth, seed) for h, seed in ((heads, 30), (kv_heads, 31),
                                                                                    (kv_heads, 32)))
    else:
        q = random((batch, heads, length, depth), seed=30)
        k, v = (random((batch, kv_heads, length, depth), seed=seed) for seed in (31, 32))
    keys_kept = np.random.default_rng(33).random((batch, 1, 1, length)) > 0.3
    keys_kept[..., 0] = True
    for mask in (None, mx.array(keys_kept)):
        assert attention_matches_mlx(_core.masked_attention(q, k, v, mask), sdpa(q, k, v, mask))


@pytest.mark.parametrize("heads, kv_heads, lengths", [
    (12, 12, [18, 18, 17, 16, 15, 14, 14, 13, 2]),  # MiniLM's heads over short sentences packed back to back
    (4, 2, [300, 1, 49]),  # grouped heads, a one-token sequence, a sequence past a query band
])
def test_packed_attention_is_each_sequence_alone(heads, kv_heads, lengths):
    """Sequences packed back to back (an encoder's batch without padding): each sequence's rows are its attention
    alone, MLX's numbers for that sequence (bit for bit under the baseline loops)."""
    tokens = sum(lengths)
    q = heads_first_view(1, tokens, heads, 32, 40)
    k, v = (heads_first_view(1, tokens, kv_heads, 32, seed) for seed in (41, 42))
    packed = _core.packed_attention_cpu(q, k, v, lengths)
    assert packed.shape == (1, heads, tokens, 32)
    first = 0
    for length in lengths:
        part = slice(first, first + length)
        alone = sdpa(*(x[:, :, part] for x in (q, k, v)), None)  # the same views: MLX copies them alike
        assert attention_matches_mlx(packed[:, :, part], alone), f"sequence at {first} of {length} tokens"
        first += length


def test_packed_attention_refuses_lengths_that_do_not_cover_the_tokens():
    q = random((1, 2, 10, 8))
    for lengths in ([4, 5], [4, 7], [10, 0]):
        with pytest.raises(ValueError, match="lengths summing to N|at least one token"):
            _core.packed_attention_cpu(q, q, q, lengths)


@pytest.mark.parametrize("heads, length", [(2, 500), (2, 333), (4, 257)])
def test_attention_at_any_key_length_is_mlxs_on_one_blas_thread(heads, length):
    """Key lengths that OpenBLAS's threaded driver splits into other blocks than its one-thread driver (here 500 and
    333, above its K block and not a multiple of 32): the same numbers as MLX's own path on one BLAS thread."""
    q, k, v = (heads_first_view(1, length, heads, 64, seed) for seed in (34, 35, 36))
    ours = _core.masked_attention(q, k, v)
    with openblas_on_one_thread():
        mlx_on_one_thread = sdpa(q, k, v)
        mx.eval(mlx_on_one_thread)
    assert attention_matches_mlx(ours, mlx_on_one_thread)


def rope_pairs_graph(x, cos, sin):
    """nn/rope.cpp's graph on the CPU: each (even, odd) pair times stack(cos, sin) and stack(-sin, cos), added."""
    b, t, h, d = x.shape
    pairs = x.reshape(b, t, h, d // 2, 2)
    x0, x1 = pairs[..., 0:1], pairs[..., 1:2]
    with_x0, with_x1 = mx.stack([cos, sin], -1), mx.stack([-sin, cos], -1)
    return (x0 * with_x0 + x1 * with_x1).reshape(b, t, h, d)


@pytest.mark.parametrize("batch, tokens, heads, depth, table_rows, normed", [
    (1, 37, 8, 64, 1, True), (2, 20, 3, 16, 2, True), (2, 9, 30, 128, 1, False), (1, 5, 1, 8, 1, True),
])
def test_head_norm_and_rope_is_the_graph_bit_for_bit(batch, tokens, heads, depth, table_rows, normed):
    """The DiT's per-head RMSNorm then RoPE in one pass: the op-by-op graph's numbers, reading q (or k) as the column
    view of a fused q|k|v projection's output it is."""
    dim = heads * depth
    fused = random((batch, tokens, 3 * dim), seed=40)
    q = fused[..., dim:2 * dim].reshape(batch, tokens, heads, depth)  # k's columns: a strided view
    table = (table_rows, tokens, 1, depth // 2)
    cos, sin = random(table, seed=41), random(table, seed=42)
    weight = random((depth,), seed=43) if normed else None
    normed_q = mx.fast.rms_norm(q, weight, 1e-5) if normed else q
    assert same_bits(_core.head_norm_rope_cpu(q, weight, 1e-5, cos, sin), rope_pairs_graph(normed_q, cos, sin))


@pytest.mark.parametrize("batch, tokens, n", [(1, 288, 512), (2, 13, 40), (3, 1, 8)])
def test_modulated_norms_are_the_graphs_bit_for_bit(batch, tokens, n):
    """A modulated block's input norm(x) * scale and its residual x + gate * norm(a), one pass each on every core."""
    x, a = random((batch, tokens, n), seed=44), random((batch, tokens, n), scale=3.0, seed=45)
    weight, vector = random((n,), seed=46), random((batch, 1, n), seed=47)
    assert same_bits(_core.scaled_rms_norm_cpu(x, weight, 1e-6, vector), mx.fast.rms_norm(x, weight, 1e-6) * vector)
    assert same_bits(_core.gated_residual_cpu(x, a, weight, 1e-6, vector),
                     x + vector * mx.fast.rms_norm(a, weight, 1e-6))


@pytest.mark.parametrize("shape", [(32, 200, 384), (7, 1536), (1, 5)])
def test_bias_add_is_mlxs_add_bit_for_bit(shape):
    y, bias = random(shape, seed=48), random(shape[-1:], seed=49)
    assert same_bits(_core.bias_add_cpu(y, bias), y + bias)


@pytest.mark.parametrize("shape", [(32, 18, 384), (3, 7, 40), (1, 1, 8)])
def test_encoder_epilogues_are_the_graphs_bit_for_bit(shape):
    """After an encoder's product y: gelu(y + bias), and layer_norm((y + bias) + residual), one pass each."""
    n = shape[-1]
    y, residual = random(shape, scale=2.0, seed=50), random(shape, seed=51)
    bias, weight, norm_bias = (random((n,), seed=seed) for seed in (52, 53, 54))
    assert same_bits(_core.bias_gelu_cpu(y, bias), _core.gelu(y + bias))
    assert same_bits(_core.bias_residual_layer_norm_cpu(y, bias, residual, weight, norm_bias, 1e-12),
                     mx.fast.layer_norm((y + bias) + residual, weight, norm_bias, 1e-12))


@pytest.mark.parametrize("batch, tokens, n", [(1, 300, 256), (2, 13, 40)])
def test_flux2_modulations_are_the_graphs_bit_for_bit(batch, tokens, n):
    """FLUX.2's one_plus_scale * layer_norm(x) + shift (no affine parameters) and x + gate * y, one pass each."""
    x, y = random((batch, tokens, n), seed=55), random((batch, tokens, n), seed=56)
    shift, scale, gate = (random((batch, 1, n), seed=seed) for seed in (57, 58, 59))
    normed = mx.fast.layer_norm(x, None, None, 1e-6)
    assert same_bits(_core.modulated_layer_norm_cpu(x, shift, 1 + scale, 1e-6), (1 + scale) * normed + shift)
    assert same_bits(_core.gated_sum_cpu(x, y, gate), x + gate * y)


def test_dit_row_kernels_name_a_bad_shape():
    with pytest.raises(ValueError, match=r"x \[B, T, H, D\] \(D even\)"):
        _core.head_norm_rope_cpu(mx.zeros((1, 4, 2, 7)), None, 1e-5, mx.zeros((1, 4, 1, 3)), mx.zeros((1, 4, 1, 3)))
    with pytest.raises(ValueError, match=r"the vector \[B, 1, N\]"):
        _core.scaled_rms_norm_cpu(mx.zeros((2, 3, 8)), mx.ones((8,)), 1e-6, mx.ones((1, 1, 8)))


@pytest.mark.parametrize("loops", ["baseline", "avx2"])
def test_attention_under_other_loops(loops):
    """The attention tests above in a process held to other loops (MLXRUNNER_CPU_LOOPS): the baseline's, where our
    attention is MLX's numbers bit for bit, and AVX2's block kernel (6 query rows a block) on an AVX-512 CPU. On a CPU
    without AVX2 the second run is the baseline's again."""
    selected = "attention and not under_other_loops"
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selected],
                         env={**os.environ, "MLXRUNNER_CPU_LOOPS": loops}, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    assert " passed" in ran.stdout and " failed" not in ran.stdout
