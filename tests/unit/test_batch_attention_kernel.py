"""The batch decode attention kernel (csrc/nn/cuda_batch_attention.cpp), run on this machine's CPU.

Its source, as MLX receives it (compacted), is compiled as host C++ with every thread of a block a std::thread
(tests/unit/cuda_emulator.py): the lanes' shares of the query, the warps' online softmax over every fourth key and
their meeting in shared memory are checked against numpy's softmax(q k^T scale) v over each row's own keys, with rows
shorter than the warps, grouped queries and stale values in the slots past a row's position (which it must not see).
What this cannot check, tests/gpu/test_measuring_switches.py does on CUDA: NVRTC's view of the source, speed.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import PRELUDE, block_launcher, compile_library, from_bf16_bits, kernel_source, to_bf16_bits

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "nn" / "cuda_batch_attention.cpp"
THREADS = 128  # the launch's block (kThreads)



def build(tmp_path: Path, d: int, q_heads: int, kv_heads: int, scale: float) -> ctypes.CDLL:
    source = kernel_source(SOURCE, "kBatchAttentionSource")
    scale_bits = int(np.array(scale, dtype=np.float32).view(np.int32))
    params = "const T* q, const T* keys, const int* keys_shape, const T* values, const int* positions, T* out"
    args = "q, keys, keys_shape, values, positions, out"
    code = PRELUDE + f"""
using T = __nv_bfloat16;
constexpr int D = {d}, Q_HEADS = {q_heads}, KV_HEADS = {kv_heads}, SCALE_BITS = {scale_bits};
static void kernel({params}) {{
{source}
}}
"""
    return compile_library(tmp_path, code + block_launcher(f"int blocks, {params}", args, "blocks", THREADS))


CASES = [  # head dim, query heads, key/value heads, each row's position (keys 0..position), capacity
    (128, 4, 1, [0, 3, 9, 40], 64),     # a row of one key, rows shorter than the 4 warps, grouped queries
    (64, 2, 2, [17, 5], 32),            # one query a key/value head
    (128, 8, 2, [255, 0, 100], 256),    # a row filling the buffer
]


@pytest.mark.parametrize("d, q_heads, kv_heads, positions, capacity", CASES)
def test_each_row_attends_to_its_own_keys(tmp_path, d, q_heads, kv_heads, positions, capacity):
    rng = np.random.default_rng(d + q_heads + len(positions))
    rows, scale = len(positions), 1 / np.sqrt(d)
    q = to_bf16_bits(rng.standard_normal((rows, q_heads, 1, d)))
    keys = to_bf16_bits(rng.standard_normal((rows, kv_heads, capacity, d)) * 2)
    values = to_bf16_bits(rng.standard_normal((rows, kv_heads, capacity, d)))
    out = np.zeros((rows, 1, q_heads * d), np.uint16)
    keys_shape = np.array(keys.shape, np.int32)
    at = np.array(positions, np.int32)
    lib = build(tmp_path, d, q_heads, kv_heads, scale)
    ptr = ctypes.c_void_p
    lib.run(ctypes.c_int(rows * q_heads), *[ptr(a.ctypes.data) for a in (q, keys, keys_shape, values, at, out)])

    got = from_bf16_bits(out).reshape(rows, q_heads, d)
    group = q_heads // kv_heads
    for b, position in enumerate(positions):
        for h in range(q_heads):
            k = from_bf16_bits(keys[b, h // group, : position + 1]).astype(np.float64)
            v = from_bf16_bits(values[b, h // group, : position + 1]).astype(np.float64)
            query = np.float32(scale) * from_bf16_bits(q[b, h, 0]).astype(np.float64)
            scores = k @ query
            weights = np.exp(scores - scores.max())
            want = (weights / weights.sum()) @ v
            # float sums in another order, then one rounding to bfloat16
            np.testing.assert_allclose(got[b, h], want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max() + 1e-6)
    assert np.abs(got).max() > 0.05  # a real signal
