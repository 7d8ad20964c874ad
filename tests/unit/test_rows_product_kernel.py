"""The short chunk's product kernel (csrc/nn/cuda_rows_product.cpp, MLXRUNNER_ROWS_PRODUCT=1), run on this machine's
CPU.

Its source, as MLX receives it (compacted), is compiled as host C++ with every thread of a block a std::thread and
mma.sync emulated from PTX's fragment layout (tests/unit/cuda_emulator.py); cp.async becomes a plain copy, blocks run
one after another. Checked against numpy's float64 x W^T rounded to bfloat16: one 8-row tile of x to all eight, rows
that leave a tile part empty, K split across blocks (the last block of a tile summing the splits' partials, splits
with no steps, the tile counters back at zero after), and x not 16-byte aligned (the element-by-element staging).
What this cannot check, NVRTC's view of the source and the speed, scripts/nvrtc_check.py and a GPU do.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import PRELUDE, block_launcher, compile_library, from_bf16_bits, kernel_source, to_bf16_bits
from test_decode_attention_kernel import HOST_COPIES, HOST_MMA

from mlxrunner import _core

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "nn" / "cuda_rows_product.cpp"
THREADS = 128  # kThreads
TILE = 64  # kTileRows
STEP = 64  # kStepColumns
STAGES = 4  # kStages
HOST_ATOMICS = r"""
inline int atomicAdd(int* p, int v) { const int old = *p; *p += v; return old; }  // blocks run one at a time here
inline void __threadfence() {}
inline float __ldcg(const float* p) { return *p; }
"""


def build(tmp_path: Path, x_tiles: int) -> ctypes.CDLL:
    # kCudaAsyncCopies (before the helpers on the GPU) as HOST_COPIES' plain copies; XT, a template argument on the GPU,
    # as the constant MLX declares; the stages' dynamic shared memory as a static array of the size the host asks for.
    helpers = kernel_source(SOURCE, "kRowsProductHelpers")
    body = kernel_source(SOURCE, "kRowsProductSource")
    shared = re.search(r"extern __shared__ __align__\(16\) unsigned char rows_shared\[\];", body)
    assert shared, "the kernel's dynamic shared memory declaration moved"
    size = STAGES * (TILE + 8 * x_tiles) * (STEP + 8) * 2
    body = body.replace(shared.group(0), f"static __align__(16) unsigned char rows_shared[{size}];")
    params = ("const T* x, const int* x_shape, int x_ndim, const T* w, const int* w_shape, const int* counters, "
              "T* out, float* partials")
    code = (PRELUDE + HOST_MMA + HOST_COPIES + HOST_ATOMICS + helpers + "using T = __nv_bfloat16;\n" +
            f"static void kernel({params}) {{\nconstexpr int XT = {x_tiles};\n{body}\n}}\n" +
            block_launcher(f"int blocks, {params}", "x, x_shape, x_ndim, w, w_shape, counters, out, partials",
                           "blocks", THREADS))
    return compile_library(tmp_path / "rows_product", code)


def pointer(a: np.ndarray, offset: int = 0):
    return ctypes.c_void_p(a.ctypes.data + offset * a.itemsize)


CASES = [  # rows of x, weight rows N, columns K, K splits, x one element off 16-byte alignment
    (64, 128, 512, 1, False),  # all eight 8-row tiles, two weight tiles, one split
    (37, 64, 512, 3, False),   # a part-empty tile of x; 8 steps split 3, 3, 2
    (2, 192, 128, 2, False),   # the fewest rows; 2 steps split 1, 1
    (9, 64, 128, 4, False),    # 2 steps over 4 splits: the last two have none and write zeros
    (12, 128, 192, 1, True),   # x not 16-byte aligned: staged element by element
]


@pytest.mark.parametrize("rows, n, k, splits, offset", CASES)
def test_the_kernel_is_x_times_w_transposed(tmp_path, rows, n, k, splits, offset):
    rng = np.random.default_rng(rows * 1000 + n + k)
    x = to_bf16_bits(rng.standard_normal((rows, k)).astype(np.float32))
    w = to_bf16_bits((rng.standard_normal((n, k)) * 0.05).astype(np.float32))
    shift = 1 if offset else 0
    x_buffer = np.zeros(rows * k + 8, np.uint16)
    x_buffer[shift:shift + rows * k] = x.reshape(-1)
    tiles = n // TILE
    counters = np.zeros(tiles, np.int32)
    out = np.zeros((rows, n), np.uint16)
    partials = np.zeros(max(splits, 1) * rows * n if splits > 1 else 1, np.float32)
    lib = build(tmp_path, (rows + 7) // 8)
    lib.run(ctypes.c_int(tiles * splits), pointer(x_buffer, shift), np.array([rows, k], np.int32).ctypes.data_as(
        ctypes.c_void_p), ctypes.c_int(2), pointer(w), np.array([n, k], np.int32).ctypes.data_as(ctypes.c_void_p),
        pointer(counters), pointer(out), pointer(partials))
    expected = from_bf16_bits(x).astype(np.float64) @ from_bf16_bits(w).astype(np.float64).T
    got = from_bf16_bits(out)
    rounded = from_bf16_bits(to_bf16_bits(expected.astype(np.float32)))
    # float sums in another order than numpy's: within a bfloat16 step of the float64 product, most of them equal
    assert np.all(np.abs(got - expected) <= np.abs(expected) * 2 ** -7 + 1e-6)
    assert np.mean(got == rounded) > 0.9
    assert np.all(counters == 0)  # each tile's last block set its count back


def test_the_host_splits_k_where_the_weight_has_few_tiles():
    assert _core.rows_product_splits(19456, 2560) == 1  # 304 tiles fill an H100 twice
    assert _core.rows_product_splits(6144, 2560) == 3  # 96 tiles
    assert _core.rows_product_splits(2560, 9728) == 7  # 40 tiles, 152 steps
    assert _core.rows_product_splits(64, 128) == 1  # two steps: too few to split


def test_the_blocks_switch_sets_the_splits_aim():
    """MLXRUNNER_ROWS_PRODUCT_BLOCKS (read once, so in a fresh process): 132 blocks over the 4B's down projection's
    40 tiles is 4 splits where the default's 264 is 7."""
    import subprocess
    import sys

    script = "from mlxrunner import _core; print(_core.rows_product_splits(2560, 9728))"
    env = {**os.environ, "MLXRUNNER_ROWS_PRODUCT_BLOCKS": "132"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"


def test_the_binding_declines_off_cuda_and_outside_its_shapes():
    import mlx.core as mx

    x = mx.zeros((4, 64), mx.bfloat16)
    assert _core.rows_product(x, mx.zeros((64, 64), mx.bfloat16)) is None or mx.cuda.is_available()
    assert _core.rows_product(x, mx.zeros((96, 64), mx.bfloat16)) is None  # 96 weight rows: not tiles of 64
    assert _core.rows_product(mx.zeros((1, 64), mx.bfloat16), mx.zeros((64, 64), mx.bfloat16)) is None  # one row
