"""The diffusion transformers' fused CUDA row kernels (csrc/nn/cuda_dit_fusion.cpp), run on this machine's CPU.

Each kernel's source, as MLX receives it (compacted, with the shared helpers of nn/cuda_kernel_common.h), is
compiled as host C++ with every thread of a block a std::thread (tests/unit/cuda_emulator.py) and launched as the
host code launches it: a warp per (token, head) row for the head norm + RoPE, a block of 256 threads per row for the
others. Its output is held to the MLX operations it replaces, computed by MLX on the CPU, within the tolerance of
tests/gpu/test_dit_fusion.py (one rounding step of the dtype: only the order of a norm's sums differs). Row widths
cover a thread holding one quad, several, and a row ending inside a quad's range of the block. Where
test_cuda_kernel_sources.py runs these sources one thread a block in float32, this runs whole blocks (the
warps' shuffles and the block's sum through shared memory, each thread's quads) in float32 and bfloat16. What
this cannot check, tests/gpu/test_dit_fusion.py does on CUDA: NVRTC's view of the source, MLX's launch, speed.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cuda_emulator import PRELUDE, block_launcher, compile_library, from_bf16_bits, kernel_source, to_bf16_bits

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "nn"
TOLERANCE = {"float": 1e-5, "bf16": 1.6e-2}  # tests/gpu/test_dit_fusion.py's, per dtype
ROW_THREADS = 256  # cuda_row_launch's block for rows up to 8,192 wide
WARP_ROWS_BLOCK = 256  # cuda_head_norm_rope_pairs' block: eight rows a block, a warp each
SWITCHES = {"NORM", "NEXT", "RESIDUAL"}  # the #if branches the host code picks with a #define

# What CUDA's bfloat16 type does besides PRELUDE's conversions: each operation in float, rounded once.
BF16_ARITHMETIC = r"""
inline __nv_bfloat16 operator*(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) * float(b)); }
inline __nv_bfloat16 operator+(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) + float(b)); }
"""


def build(tmp_path: Path, kernel: str, inputs: dict[str, str], outputs: list[str], constants: dict[str, int],
          dtype: str, with_helpers: bool) -> ctypes.CDLL:
    """`kernel` of cuda_dit_fusion.cpp as a host function run(blocks, threads, ...) taking, per input, its data, an
    int shape and a long long strides pointer (the names MLX gives them: x, x_shape, x_strides), then the outputs."""
    body = kernel_source(CSRC / "cuda_dit_fusion.cpp", kernel)
    helpers = ""
    if with_helpers:
        common = CSRC / "cuda_kernel_common.h"
        helpers = kernel_source(common, "kCudaBlockSum") + kernel_source(common, "kCudaRowHelpers")
    element = "__nv_bfloat16" if dtype == "bf16" else "float"
    params = []
    for name, kind in inputs.items():
        params += [f"const {element if kind == 'T' else 'float'}* {name}", f"const int* {name}_shape",
                   f"const long long* {name}_strides"]
    params += [f"T* {name}" for name in outputs]
    signature = ", ".join(params)
    args = ", ".join(p.split()[-1] for p in params)
    # The kernels' #if switches as defines, their template arguments as constants (MLX's are template parameters).
    defines = "".join(f"#define {k} {v}\n" for k, v in constants.items() if k in SWITCHES)
    values = "".join(f"constexpr int {k} = {v};\n" for k, v in constants.items() if k not in SWITCHES)
    code = (PRELUDE + BF16_ARITHMETIC + f"using T = {element};\n{values}{defines}{helpers}\n" +
            f"static void kernel({signature}) {{\n{body}\n}}\n" +
            block_launcher(f"int blocks, int threads, {signature}", args, "blocks", "threads"))
    return compile_library(tmp_path, code)


def device_array(a: mx.array, dtype: str) -> np.ndarray:
    """An MLX array as the kernel reads it: float32, or bfloat16 bits."""
    values = np.array(a.astype(mx.float32))
    return to_bf16_bits(values) if dtype == "bf16" else np.ascontiguousarray(values)


def launch(lib, blocks: int, threads: int, inputs: list[np.ndarray], strides: list[tuple], outputs: list[np.ndarray]):
    ptr = ctypes.c_void_p
    shapes = [np.array(a.shape, np.int32) for a in inputs]  # held until the call returns
    element_strides = [np.array(s, np.int64) for s in strides]
    arguments = []
    for array, shape, stride in zip(inputs, shapes, element_strides):
        arguments += [ptr(array.ctypes.data), ptr(shape.ctypes.data), ptr(stride.ctypes.data)]
    arguments += [ptr(out.ctypes.data) for out in outputs]
    lib.run(ctypes.c_int(blocks), ctypes.c_int(threads), *arguments)


def host_value(a: np.ndarray, dtype: str) -> np.ndarray:
    return from_bf16_bits(a) if dtype == "bf16" else a


def relative_error(got: np.ndarray, expected: mx.array) -> float:
    want = np.array(expected.astype(mx.float32))
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


MX_DTYPE = {"float": mx.float32, "bf16": mx.bfloat16}


def eps_bits(eps: float) -> int:
    return int(np.array(eps, np.float32).view(np.int32))


@pytest.mark.parametrize("dtype", ["float", "bf16"])
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize(("batch", "tokens", "heads", "d", "table_batch"), [(1, 5, 3, 128, 1), (2, 3, 2, 64, 2)])
def test_head_norm_rope_is_norm_then_rotation(tmp_path, dtype, with_norm, batch, tokens, heads, d, table_batch):
    keys = mx.random.split(mx.random.key(d + tokens), 3)
    x = (3 * mx.random.normal((batch, tokens, heads, d), key=keys[0])).astype(MX_DTYPE[dtype])
    weight = (1 + 0.1 * mx.random.normal((d,), key=keys[1])).astype(MX_DTYPE[dtype])
    angles = 40.0 * mx.random.uniform(shape=(table_batch, tokens, 1, d // 2), key=keys[2])
    cos, sin = mx.cos(angles), mx.sin(angles)
    inputs = {"x": "T", "weight": "T", "cos_table": "float", "sin_table": "float"}
    if not with_norm:
        del inputs["weight"]
    lib = build(tmp_path, "kHeadNormRopePairs", inputs, ["out"],
                {"D": d, "PAIRS": d // 64, "EPS_BITS": eps_bits(1e-5), "NORM": int(with_norm)}, dtype, False)
    arrays = [device_array(x, dtype)] + ([device_array(weight, dtype)] if with_norm else [])
    arrays += [np.array(cos, np.float32), np.array(sin, np.float32)]
    out = np.zeros(x.shape, np.uint16 if dtype == "bf16" else np.float32)
    blocks = -(-batch * tokens * heads * 32 // WARP_ROWS_BLOCK)  # a warp a row
    launch(lib, blocks, WARP_ROWS_BLOCK, arrays, [contiguous_strides(a.shape) for a in arrays], [out])

    normed = mx.fast.rms_norm(x, weight, 1e-5) if with_norm else x
    pairs = normed.astype(mx.float32).reshape(batch, tokens, heads, d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    expected = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x.shape).astype(x.dtype)
    assert relative_error(host_value(out, dtype), expected) <= TOLERANCE[dtype]


def row_inputs(dtype: str, batch: int, tokens: int, n: int, seed: int):
    keys = mx.random.split(mx.random.key(seed), 6)
    t = MX_DTYPE[dtype]
    x = (4 * mx.random.normal((batch, tokens, n), key=keys[0])).astype(t)
    a = (2 * mx.random.normal((batch, tokens, n), key=keys[1])).astype(t)
    weights = [(1 + 0.1 * mx.random.normal((n,), key=k)).astype(t) for k in keys[2:4]]
    per_sample = [(1 + 0.5 * mx.random.normal((batch, 1, n), key=k)).astype(t) for k in keys[4:6]]
    return x, a, weights, per_sample


def per_thread(n: int) -> int:
    """cuda_row_launch's PER_THREAD for a row of n in quads."""
    return -(-n // (ROW_THREADS * 4)) * 4


# A quad a thread (some none); whole quads; rows ending inside the threads' second and third quads.
ROW_SHAPES = [(1, 3, 100), (2, 2, 1024), (1, 2, 1540), (1, 2, 2056)]


@pytest.mark.parametrize("dtype", ["float", "bf16"])
@pytest.mark.parametrize(("batch", "tokens", "n"), ROW_SHAPES)
def test_scaled_rms_norm_is_the_norm_times_the_scale(tmp_path, dtype, batch, tokens, n):
    x, _, (weight, _), (scale, _) = row_inputs(dtype, batch, tokens, n, seed=n + tokens)
    lib = build(tmp_path, "kScaledRmsNorm", {"x": "T", "weight": "T", "scale": "T"}, ["out"],
                {"EPS_BITS": eps_bits(1e-5), "PER_THREAD": per_thread(n)}, dtype, True)
    arrays = [device_array(a, dtype) for a in (x, weight, scale)]
    out = np.zeros(x.shape, arrays[0].dtype)
    launch(lib, batch * tokens, ROW_THREADS, arrays, [contiguous_strides(a.shape) for a in arrays], [out])
    assert relative_error(host_value(out, dtype), mx.fast.rms_norm(x, weight, 1e-5) * scale) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float", "bf16"])
@pytest.mark.parametrize(("batch", "tokens", "n"), ROW_SHAPES)
@pytest.mark.parametrize("with_next", [True, False])
def test_gated_residual_is_x_plus_gate_times_the_normed_term(tmp_path, dtype, batch, tokens, n, with_next):
    x, a, (a_weight, next_weight), (gate, next_scale) = row_inputs(dtype, batch, tokens, n, seed=tokens)
    gate = mx.tanh(gate)
    inputs = {"x": "T", "a": "T", "a_weight": "T", "gate": "T"}
    values = [x, a, a_weight, gate]
    outputs = ["h"]
    if with_next:
        inputs |= {"next_weight": "T", "next_scale": "T"}
        values += [next_weight, next_scale]
        outputs.append("next")
    lib = build(tmp_path, "kGatedResidual", inputs, outputs,
                {"EPS_BITS": eps_bits(1e-5), "NEXT_EPS_BITS": eps_bits(1e-6), "PER_THREAD": per_thread(n),
                 "NEXT": int(with_next)}, dtype, True)
    arrays = [device_array(v, dtype) for v in values]
    results = [np.zeros(x.shape, arrays[0].dtype) for _ in outputs]
    launch(lib, batch * tokens, ROW_THREADS, arrays, [contiguous_strides(v.shape) for v in arrays], results)

    h = host_value(results[0], dtype)
    assert relative_error(h, x + gate * mx.fast.rms_norm(a, a_weight, 1e-5)) <= TOLERANCE[dtype]
    if with_next:  # from the kernel's own h, so that a rounding step in h does not count twice
        ours_h = mx.array(h).astype(x.dtype)
        expected = mx.fast.rms_norm(ours_h, next_weight, 1e-6) * next_scale
        assert relative_error(host_value(results[1], dtype), expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float", "bf16"])
@pytest.mark.parametrize(("batch", "tokens", "n"), ROW_SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_modulated_layer_norm_reads_its_vectors_through_strides(tmp_path, dtype, batch, tokens, n, with_residual):
    """FLUX.2's (1 + scale) * layer_norm(x) + shift, its vectors ranges of one modulation output [B, 1, 3n]."""
    x, y, _, _ = row_inputs(dtype, batch, tokens, n, seed=tokens + 1)
    mod = (0.5 * mx.random.normal((batch, 1, 3 * n), key=mx.random.key(9))).astype(MX_DTYPE[dtype])
    shift, scale, gate = mx.split(mod, 3, axis=-1)
    one_plus_scale = 1 + scale
    # The vectors as the kernel gets them: shift and gate ranges of `mod` (its strides), one_plus_scale its own.
    mod_bits = device_array(mod, dtype)
    vector_strides = (3 * n, 3 * n, 1)
    inputs = {"x": "T"} | ({"y": "T", "gate": "T"} if with_residual else {}) | {"one_plus_scale": "T", "shift": "T"}
    lib = build(tmp_path, "kModulatedLayerNorm", inputs, ["h", "out"] if with_residual else ["out"],
                {"EPS_BITS": eps_bits(1e-6), "PER_THREAD": per_thread(n), "RESIDUAL": int(with_residual)}, dtype,
                True)
    element = mod_bits.dtype
    gate_view = np.lib.stride_tricks.as_strided(mod_bits[..., 2 * n:], (batch, 1, n), mod_bits.strides)
    shift_view = np.lib.stride_tricks.as_strided(mod_bits, (batch, 1, n), mod_bits.strides)
    arrays = [device_array(x, dtype)]
    strides = [contiguous_strides(x.shape)]
    if with_residual:
        arrays += [device_array(y, dtype), gate_view]
        strides += [contiguous_strides(x.shape), vector_strides]
    arrays += [device_array(one_plus_scale, dtype), shift_view]
    strides += [contiguous_strides(one_plus_scale.shape), vector_strides]
    results = [np.zeros(x.shape, element) for _ in range(2 if with_residual else 1)]
    launch(lib, batch * tokens, ROW_THREADS, arrays, strides, results)

    h = x + gate * y if with_residual else x
    if with_residual:
        assert relative_error(host_value(results[0], dtype), h) <= TOLERANCE[dtype]
        h = mx.array(host_value(results[0], dtype)).astype(x.dtype)
    expected = one_plus_scale * mx.fast.layer_norm(h, None, None, 1e-6) + shift
    assert relative_error(host_value(results[-1], dtype), expected) <= TOLERANCE[dtype]
