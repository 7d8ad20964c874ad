"""Our CUDA kernels' sources, checked on a machine without a GPU.

The fused kernels (csrc/nn/cuda_norm_rope.cpp, csrc/nn/cuda_dit_fusion.cpp) are CUDA source strings that MLX
compiles at their first use on a GPU: a slip in one would surface only there. Here each source is compiled as host
C++ by the compiler that builds `_core` (T = float, the kernel's template arguments as constants, CUDA's few
built-ins as plain functions), and the row kernels run one block at a time with a single thread per block, so
that `block_sum` is the thread's own sum, against numpy. What this cannot check, tests/gpu/test_dit_fusion.py and
tests/gpu/test_norm_rope.py do on CUDA: the block-wide reduction, half-precision roundings, speed.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "nn"
SOURCES = ["cuda_kernel_common.h", "cuda_norm_rope.h", "cuda_norm_rope.cpp", "cuda_dit_fusion.cpp"]
WIDTH = 100  # a row: not a multiple of anything the kernels tile by
EPS = 1e-5

# CUDA's built-ins the kernels use, for one thread per block.
PRELUDE = r"""
#include <cmath>
#include <cstddef>
#include <cstring>
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static Dim3 threadIdx, blockIdx, blockDim;
#define __device__
#define __forceinline__ inline
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int bits) { float f; std::memcpy(&f, &bits, 4); return f; }
inline float block_sum(float v) { return v; }
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
extern "C" void run_block(unsigned block) { blockIdx.x = block; threadIdx.x = 0; blockDim.x = 1; }
"""

# name -> (source constant, #define lines, inputs, outputs): the kernels as mx::fast::cuda_kernel declares them.
KERNELS = {
    "add_rms_norm": ("kAddRmsNorm", "", ["x", "delta", "weight"], ["added", "normed"]),
    "scaled_rms_norm": ("kScaledRmsNorm", "", ["x", "weight", "scale"], ["out"]),
    "gated_residual": ("kGatedResidual", "#define NEXT 0", ["x", "a", "a_weight", "gate"], ["h"]),
    "gated_residual_norm": ("kGatedResidual", "#define NEXT 1",
                            ["x", "a", "a_weight", "gate", "next_weight", "next_scale"], ["h", "next"]),
    "modulated_layer_norm": ("kModulatedLayerNorm", "#define RESIDUAL 0", ["x", "one_plus_scale", "shift"], ["out"]),
    "gated_residual_modulated_layer_norm": ("kModulatedLayerNorm", "#define RESIDUAL 1",
                                            ["x", "y", "gate", "one_plus_scale", "shift"], ["h", "out"]),
    # Compiled here only: head_norm_rope's threads share a block_sum, qk_norm_rope's lanes a warp's shuffles (it runs
    # on emulated warps in tests/unit/test_small_cuda_kernels.py).
    "head_norm_rope": ("kHeadNormRopePairs", "#define NORM 1", ["x", "weight", "cos_table", "sin_table"], ["out"]),
    "qk_norm_rope": ("kQkRope", "#define NORM 1", ["qkv", "q_weight", "k_weight", "inverse_frequencies", "offsets"],
                     ["q_out", "k_out", "v_out"]),
}


def kernel_sources() -> dict[str, str]:
    found = {}
    for name in SOURCES:
        text = (CSRC / name).read_text()
        found.update(re.findall(r'constexpr const char\* (\w+) = R"\((.*?)\)";', text, re.S))
    return found


def as_function(name: str, body: str, defines: str, inputs: list[str], outputs: list[str]) -> str:
    params = [f"const float* {n}, const int* {n}_shape, const long long* {n}_strides" for n in inputs]
    params += [f"float* {n}" for n in outputs]
    bits = struct.unpack("<i", struct.pack("<f", EPS))[0]
    constants = {"PER_THREAD": WIDTH, "EPS_BITS": bits, "NEXT_EPS_BITS": bits, "D": 128, "Q_HEADS": 4,
                 "KV_HEADS": 2, "TRADITIONAL": 0, "PAIRS": 2}
    lines = "".join(f"  constexpr int {k} = {v};\n" for k, v in constants.items())
    undefine = "".join(f"#undef {line.split()[1]}\n" for line in defines.splitlines())
    signature = f'extern "C" void {name}({", ".join(params)})'
    return f"{defines}\n{signature} {{\n  using T = float;\n{lines}{body}\n}}\n{undefine}"


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert compiler, "no C++ compiler: building _core needs one too"
    sources = kernel_sources()
    code = PRELUDE + sources["kCudaRowHelpers"] + sources["kCudaHeadNormRope"]
    code += "".join(as_function(name, sources[const], defines, ins, outs)
                    for name, (const, defines, ins, outs) in KERNELS.items())
    folder = tmp_path_factory.mktemp("kernels")
    (folder / "kernels.cpp").write_text(code)
    built = subprocess.run([compiler, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wno-unknown-pragmas", "-o",
                            str(folder / "kernels.so"), str(folder / "kernels.cpp")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return ctypes.CDLL(str(folder / "kernels.so"))


def run_rows(lib, name: str, inputs: list[np.ndarray], rows: int) -> list[np.ndarray]:
    """Runs kernel `name` one block per row; returns its outputs, each shaped as the first input."""
    keep, args = [], []
    for array in inputs:
        shape = np.array(array.shape, np.int32)
        strides = np.array([s // array.itemsize for s in array.strides], np.int64)
        keep += [shape, strides]
        args += [array.ctypes.data, shape.ctypes.data, strides.ctypes.data]
    outputs = [np.zeros_like(inputs[0]) for _ in KERNELS[name][3]]
    args += [out.ctypes.data for out in outputs]
    for row in range(rows):
        lib.run_block(row)
        getattr(lib, name)(*[ctypes.c_void_p(a) for a in args])
    return outputs


def rms_norm(v, weight):
    return v / np.sqrt((v.astype(np.float64) ** 2).mean(-1, keepdims=True) + EPS) * weight


def layer_norm(v):
    v = v.astype(np.float64)
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + EPS)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)

    def normal(*shape, scale=1.0, offset=0.0):
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    batch, tokens = 2, 3
    return {"x": normal(batch, tokens, WIDTH, scale=3), "a": normal(batch, tokens, WIDTH),
            "w1": normal(WIDTH, scale=0.1, offset=1), "w2": normal(WIDTH, scale=0.1, offset=1),
            "gate": normal(batch, 1, WIDTH), "scale": normal(batch, 1, WIDTH, offset=1),
            "shift": normal(batch, 1, WIDTH), "count": batch * tokens}


def test_every_kernel_source_compiles(kernels):
    for name in KERNELS:
        assert hasattr(kernels, name)


def test_add_rms_norm(kernels, rows):
    added, normed = run_rows(kernels, "add_rms_norm", [rows["x"], rows["a"], rows["w1"]], rows["count"])
    np.testing.assert_array_equal(added, rows["x"] + rows["a"])
    np.testing.assert_allclose(normed, rms_norm(rows["x"] + rows["a"], rows["w1"]), rtol=1e-5, atol=1e-5)


def test_scaled_rms_norm(kernels, rows):
    (out,) = run_rows(kernels, "scaled_rms_norm", [rows["x"], rows["w1"], rows["scale"]], rows["count"])
    np.testing.assert_allclose(out, rms_norm(rows["x"], rows["w1"]) * rows["scale"], rtol=1e-5, atol=1e-5)


def test_gated_residual_and_the_next_norm(kernels, rows):
    inputs = [rows["x"], rows["a"], rows["w1"], rows["gate"]]
    expected_h = rows["x"] + rows["gate"] * rms_norm(rows["a"], rows["w1"])
    (h,) = run_rows(kernels, "gated_residual", inputs, rows["count"])
    np.testing.assert_allclose(h, expected_h, rtol=1e-5, atol=1e-5)
    h, following = run_rows(kernels, "gated_residual_norm", inputs + [rows["w2"], rows["scale"]], rows["count"])
    np.testing.assert_allclose(h, expected_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(following, rms_norm(h, rows["w2"]) * rows["scale"], rtol=1e-5, atol=1e-5)


def test_modulated_layer_norm_alone_and_after_a_gated_residual(kernels, rows):
    x, y = rows["x"], rows["a"]
    (out,) = run_rows(kernels, "modulated_layer_norm", [x, rows["scale"], rows["shift"]], rows["count"])
    np.testing.assert_allclose(out, rows["scale"] * layer_norm(x) + rows["shift"], rtol=1e-5, atol=1e-5)
    h, out = run_rows(kernels, "gated_residual_modulated_layer_norm", [x, y, rows["gate"], rows["scale"],
                                                                       rows["shift"]], rows["count"])
    np.testing.assert_array_equal(h, x + rows["gate"] * y)
    np.testing.assert_allclose(out, rows["scale"] * layer_norm(h) + rows["shift"], rtol=1e-5, atol=1e-5)


def test_a_kernel_source_is_compacted_and_its_switches_resolved():
    """What our kernels hand MLX (which hashes the whole source at every launch): comments, indentation and blank
    lines gone, `#if SWITCH` branches resolved, other preprocessor lines and string literals untouched."""
    from mlxrunner import _core

    source = '''
  // a comment line
  #include "a//b.cuh"
  const int a = 1;  // trailing comment
#if FAST
  int fast = 1;
  #if NORM
  int norm = 1;
  #endif
#else
  int slow = 1;
#endif
#if OTHER
  int other = 1;
#else
  int not_other = 1;
#endif

  int after = 2;
'''
    fast = _core.compact_kernel_source(source, {"FAST": True})
    assert fast == ('#include "a//b.cuh"\nconst int a = 1;\nint fast = 1;\n#if NORM\nint norm = 1;\n#endif\n'
                    '#if OTHER\nint other = 1;\n#else\nint not_other = 1;\n#endif\nint after = 2;\n')
    slow = _core.compact_kernel_source(source, {"FAST": False, "OTHER": True})
    assert slow == '#include "a//b.cuh"\nconst int a = 1;\nint slow = 1;\nint other = 1;\nint after = 2;\n'
    with pytest.raises(ValueError, match="without its #endif"):
        _core.compact_kernel_source("#if FAST\nint a;\n", {"FAST": True})
    with pytest.raises(ValueError, match="#elif"):
        _core.compact_kernel_source("#if FAST\nint a;\n#elif OTHER\nint b;\n#endif\n", {"FAST": True})


def test_the_decode_products_sources_shrink_to_what_each_variant_runs():
    from mlxrunner import _core

    text = (CSRC / "cuda_matvec.cpp").read_text()
    body = dict(re.findall(r'constexpr const char\* (\w+) = R"\((.*?)\)";', text, re.S))["kTensorCoreSource"]
    plain = _core.compact_kernel_source(body, {"MLXR_NORMED": False, "MLXR_HEADS": False})
    heads = _core.compact_kernel_source(body, {"MLXR_NORMED": True, "MLXR_HEADS": True})
    assert "MLXR_" not in plain and "staged" not in plain and "heads_out" not in plain
    assert "staged" in heads and "heads_out" in heads and "MLXR_STAGE" in heads
    assert "//" not in plain + heads
    assert len(plain) < 0.5 * len(body)


def test_a_kernel_source_handed_over_by_its_path():
    """MLXRUNNER_KERNEL_SOURCES_BY_PATH=1 hands MLX one #include line in place of a kernel's source: the line must
    name a file, private to this process, that holds the source as it was (the host's preprocessor, given the line,
    gives the source back), and mention each input's shape / strides / ndim that the source uses, which MLX looks for
    in what it is given to decide what to pass."""
    from mlxrunner import _core

    source = "const int n = x_shape[0];\nfor (int i = 0; i < n; ++i) out[i] = x[i] * w[i * w_strides[0]];\n"
    handed = _core.kernel_source_included(source, ["x", "w", "bias"])
    mentions, include = handed.rstrip("\n").split("\n")
    assert mentions == "(void)x_shape;(void)w_strides;"
    path = Path(re.fullmatch(r'#include "(/.+\.cuh)"', include).group(1))
    assert path.read_text() == source
    assert path.parent.stat().st_mode & 0o777 == 0o700  # nobody else can change what the compiler reads
    assert _core.kernel_source_included(source, ["x", "w"]) == handed  # the same source: the same file
    other = _core.kernel_source_included(source + "out[0] = 0;\n")
    assert other.startswith("#include") and other != include + "\n"
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.fail("no host C++ compiler to preprocess with")
    expanded = subprocess.run([compiler, "-E", "-P", "-x", "c++", "-"], input=include + "\n", capture_output=True,
                              text=True, check=True).stdout
    assert expanded.split() == source.split()
