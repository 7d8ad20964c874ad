"""Two small CUDA kernels of the decode step, run on this machine's CPU (tests/unit/cuda_emulator.py: every thread of a
block a std::thread, a warp's lanes meeting for their shuffles), against numpy:

- the q/k norm + RoPE (csrc/nn/cuda_norm_rope.cpp, kQkRope: a warp a head, its sum of squares by shuffles), with and
  without Qwen3's per-head norms, for every head of q and k at positions offset + t, written heads first;
- greedy sampling's argmax (csrc/nn/cuda_argmax.cpp, kArgmax: a block a row, 16-byte words and the elements around
  them, the warps' and the block's bests), against numpy's argmax, NaN counting as the largest, ties to the first.

What this cannot check (the real warps, NVRTC, half-precision rounding on the device) tests/gpu/test_norm_rope.py and
tests/gpu/test_argmax.py do on CUDA.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import NN, PRELUDE, block_launcher, build_qk_rope, compile_library, kernel_source

Q_HEADS, KV_HEADS, D = 4, 2, 128
HEADS_A_BLOCK = 4  # kQkHeadsABlock
EPS = 1e-6


def build_rope(tmp_path: Path, norm: bool):
    eps_bits = int(np.array(EPS, np.float32).view(np.int32))
    constants = (f"using T = float;\nconstexpr int D = {D}, Q_HEADS = {Q_HEADS}, KV_HEADS = {KV_HEADS}, "
                 f"TRADITIONAL = 0, EPS_BITS = {eps_bits};\n")
    return build_qk_rope(tmp_path / f"rope-{int(norm)}", constants, norm)


def rope_reference(qkv, q_weight, k_weight, frequencies, offsets, norm: bool):
    b, t = qkv.shape[:2]
    heads = qkv[:, :, : Q_HEADS + KV_HEADS].astype(np.float64)
    if norm:
        heads = heads / np.sqrt((heads ** 2).mean(-1, keepdims=True) + EPS)
        weights = np.concatenate([np.tile(q_weight, (Q_HEADS, 1)), np.tile(k_weight, (KV_HEADS, 1))])
        heads = heads * weights
    positions = (offsets[:, None] if offsets.size == b else np.full((b, 1), offsets[0])) + np.arange(t)[None, :]
    angles = positions[:, :, None, None] * frequencies.astype(np.float64)[None, None, None, :]
    x1, x2 = heads[..., : D // 2], heads[..., D // 2:]
    rotated = np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x1 * np.sin(angles) + x2 * np.cos(angles)], -1)
    return rotated.transpose(0, 2, 1, 3)  # heads first


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize(("batch", "tokens", "offsets"), [(1, 1, [37]), (2, 5, [0, 1000])])
def test_qk_rope_is_the_heads_norms_then_their_rotations(tmp_path, norm, batch, tokens, offsets):
    rng = np.random.default_rng(tokens + batch + norm)
    qkv = (3 * rng.standard_normal((batch, tokens, Q_HEADS + 2 * KV_HEADS, D))).astype(np.float32)
    q_weight = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    k_weight = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    frequencies = (1.0 / 10000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    offsets = np.array(offsets, np.int32)
    q_out = np.zeros((batch, Q_HEADS, tokens, D), np.float32)
    k_out = np.zeros((batch, KV_HEADS, tokens, D), np.float32)
    v_out = np.zeros((batch, KV_HEADS, tokens, D), np.float32)
    heads = batch * tokens * (Q_HEADS + 2 * KV_HEADS)
    blocks = -(-heads // HEADS_A_BLOCK) + 1  # one block more than needed: its warps must leave without writing
    ptr = ctypes.c_void_p
    arrays = [qkv, np.array(qkv.shape, np.int32), q_weight, k_weight, frequencies, offsets,
              np.array(offsets.shape, np.int32), q_out, k_out, v_out]
    build_rope(tmp_path, norm).run(ctypes.c_int(blocks), *[ptr(a.ctypes.data) for a in arrays])
    want = rope_reference(qkv, q_weight, k_weight, frequencies, offsets, norm)
    np.testing.assert_allclose(q_out, want[:, :Q_HEADS], rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(k_out, want[:, Q_HEADS:], rtol=2e-5, atol=2e-4)
    # The value heads, copied heads first: the same bits.
    np.testing.assert_array_equal(v_out, qkv[:, :, Q_HEADS + KV_HEADS :].transpose(0, 2, 1, 3))


ARGMAX_THREADS = 1024  # kArgmaxThreads


def build_argmax(tmp_path: Path):
    params = "const T* z, const int* z_shape, int z_ndim, int* out"
    code = (PRELUDE + "using T = float;\n" +
            f"static void kernel({params}) {{\n{kernel_source(NN / 'cuda_argmax.cpp', 'kArgmax')}\n}}\n" +
            block_launcher(f"int blocks, {params}", "z, z_shape, z_ndim, out", "blocks", ARGMAX_THREADS))
    return compile_library(tmp_path / "argmax", code)


def numpy_argmax(row: np.ndarray) -> int:
    nans = np.flatnonzero(np.isnan(row))
    return int(nans[0]) if nans.size else int(np.argmax(row))  # numpy's own answer with a NaN, spelled out


def test_argmax_is_numpys_over_words_edges_ties_and_nans(tmp_path):
    rng = np.random.default_rng(0)
    width = 40_003  # rows that start off the 16-byte boundaries, and a tail past the last whole word
    rows = rng.standard_normal((7, width)).astype(np.float32)
    rows[0, [17, 30_000]] = 9.0  # a tie: the first wins
    rows[1, 0] = 9.0
    rows[2, width - 1] = 9.0  # in the tail
    rows[3, :] = -np.inf
    rows[4, [12_345, 20_000]] = np.nan  # the first NaN, over any number
    rows[4, 100] = 50.0
    rows[5, :] = np.nan
    # row 6: plain random
    flat = np.concatenate([np.zeros(1, np.float32), rows.ravel()])[1:]  # a view 4 bytes into its buffer
    out = np.full(7, -1, np.int32)
    ptr = ctypes.c_void_p
    arrays = [flat, np.array(rows.shape, np.int32)]
    build_argmax(tmp_path).run(ctypes.c_int(7), ptr(arrays[0].ctypes.data), ptr(arrays[1].ctypes.data),
                               ctypes.c_int(2), ptr(out.ctypes.data))
    assert out.tolist() == [numpy_argmax(row) for row in rows]
    assert out.tolist()[:6] == [17, 0, width - 1, 0, 12_345, 0]
