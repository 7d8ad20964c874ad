"""The tensor-core decode product (csrc/nn/cuda_matvec.cpp, kTensorCoreSource), run on this machine's CPU.

What can go wrong in that kernel is bookkeeping: which lane holds which weight, which column of x meets it in an
mma's k-slots, which output a lane's sums land on. Here its source is compiled as host C++: every lane of a block
is a thread, and the mma.sync instruction is emulated from PTX's fragment layout for m16n8k16 (each lane hands in
its registers, the warp's 16 x 16 and 16 x 8 tiles are rebuilt from them, each lane takes back its sums), so the
kernel's own lane bookkeeping is checked against numpy. Bfloat16 is emulated bit for bit (round to nearest even).
What this cannot check, tests/gpu/test_quant_backends.py does on CUDA: NVRTC's view of the source, speed.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import PRELUDE, block_launcher, compile_library, from_bf16_bits, to_bf16_bits

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "nn" / "cuda_matvec.cpp"

HOST_MMA = r"""
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __nv_bfloat16) {
  emulated_mma<__nv_bfloat16>(d, a, b);
}
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __half) {
  emulated_mma<__half>(d, a, b);
}
"""


def kernel_parts(normed: bool = False, heads: bool = False) -> tuple[str, str]:
    """The helpers and the kernel's body as the runner hands them to MLX: compacted, the variant's branches
    resolved (csrc/nn/cuda_kernel_common.h)."""
    from mlxrunner import _core

    text = SOURCE.read_text()
    switches = {"MLXR_NORMED": normed, "MLXR_HEADS": heads}
    sources = {name: _core.compact_kernel_source(source, switches)
               for name, source in re.findall(r'constexpr const char\* (\w+) = R"\((.*?)\)";', text, re.S)}
    # The emulated mma in place of the asm one the host code puts before the helpers (kCudaMma).
    helpers = HOST_MMA + sources["kTensorCoreHelpers"]
    # MLX's device headers give way to the prelude's functors.
    helpers, count = re.subn(r'#include "mlx/backend/cuda/device/\w+\.cuh"\n', "", helpers)
    assert count == 2, "the helpers' two MLX includes were not found"
    return helpers + sources["kHeadsHelpers"], sources["kTensorCoreSource"]


def build(tmp_path: Path, dtype: str, bits: int, group: int, rows: int, warps: int, passes: int,
          gated: bool = False, normed: bool = False, add: bool = False, eps: float = 1e-6,
          heads: dict | None = None) -> ctypes.CDLL:
    """The kernel as a library: run(x, x_shape, delta, norm_weight, w, w_shape, scales, biases, out, added, q_weight,
    k_weight, inverse_frequencies, offsets, offsets_shape, q_out, k_out, v_out) (the last eight for `heads`, the
    MLXR_HEADS variant: a dict of head_dim, q_heads, kv_heads, traditional, qk_norm, qk_eps; the tokens a sequence
    come from x's shape, as on the GPU)."""
    helpers, body = kernel_parts(normed=normed or bool(heads), heads=bool(heads))
    constants = {"BITS": bits, "GROUP": group, "XT": (rows + 7) // 8, "W": warps, "U": passes, "GATED": int(gated),
                 "ADD": int(add), "EPS_BITS": int(np.array(eps, dtype=np.float32).view(np.int32))}
    if heads:
        constants.update({"HEAD_DIM": heads["head_dim"], "Q_HEADS": heads["q_heads"], "KV_HEADS": heads["kv_heads"],
                          "TRADITIONAL": int(heads["traditional"]),
                          "QK_NORM": int(heads["qk_norm"]),
                          "QK_EPS_BITS": int(np.array(heads["qk_eps"], dtype=np.float32).view(np.int32))})
        blocks = f"{heads['q_heads'] + 2 * heads['kv_heads']}"
        warps_a_block = warps * heads["head_dim"] // 16
    else:
        blocks = "(w_shape[0] / 2 + 7) / 8" if gated else "(w_shape[0] + 15) / 16"
        warps_a_block = warps
    lines = "".join(f"  constexpr int {k} = {v};\n" for k, v in constants.items())
    params = ("const T* x, const int* x_shape, int x_ndim, const T* delta, const T* norm_weight, const uint32_t* w, "
              "const int* w_shape, const T* scales, const T* biases, T* out, T* added, const T* q_weight, "
              "const T* k_weight, const float* inverse_frequencies, const int* offsets, const int* offsets_shape, "
              "T* q_out, T* k_out, T* v_out")
    args = ("x, x_shape, x_ndim, delta, norm_weight, w, w_shape, scales, biases, out, added, q_weight, k_weight, "
            "inverse_frequencies, offsets, offsets_shape, q_out, k_out, v_out")
    header = SOURCE.with_suffix(".h").read_text()  # the larger of the kernel's stage sizes
    stage = int(re.search(r"constexpr int kMaxStagedElements = (\d+);", header).group(1))
    code = (PRELUDE + f"#define MLXR_NORMED {int(normed or bool(heads))}\n#define MLXR_HEADS {int(bool(heads))}\n" +
            f"#define MLXR_STAGE {stage}\n" +
            helpers + f"\nusing T = {dtype};\n" + f"static void kernel({params}) {{\n" + lines + body + "\n}\n" +
            block_launcher(params, args, blocks, 32 * warps_a_block))
    return compile_library(tmp_path, code)



def half_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    return to_bf16_bits(a) if dtype == "__nv_bfloat16" else a.astype(np.float16).view(np.uint16)


def half_values(bits: np.ndarray, dtype: str) -> np.ndarray:
    return from_bf16_bits(bits) if dtype == "__nv_bfloat16" else bits.view(np.float16).astype(np.float32)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's affine layout: weight i of a row in bits [bits * (i % per_word), ...) of word i / per_word."""
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per_word)
    return np.bitwise_or.reduce(q << (bits * np.arange(per_word, dtype=np.uint32)), axis=2).astype(np.uint32)


CASES = [  # dtype, bits, group, rows of x, n, k, warps, segments a pass
    ("__nv_bfloat16", 4, 64, 1, 32, 256, 1, 2),
    ("__nv_bfloat16", 4, 32, 3, 40, 96, 2, 1),     # a partial tile, a partial segment, two warps
    ("__nv_bfloat16", 4, 128, 8, 16, 512, 4, 2),
    ("__nv_bfloat16", 4, 64, 13, 24, 192, 1, 1),   # two 8-row tiles of x
    ("__nv_bfloat16", 8, 64, 1, 32, 256, 2, 2),
    ("__nv_bfloat16", 8, 32, 5, 20, 160, 1, 4),
    ("__half", 4, 64, 2, 16, 128, 1, 1),
    ("__half", 8, 128, 7, 16, 384, 2, 1),
    ("__nv_bfloat16", 4, 64, 1, 32, 2048, 16, 1),  # a few-tile product's 16 warps a tile, a segment each
    ("__nv_bfloat16", 16, 64, 1, 32, 256, 2, 2),   # half-precision weights (bits 16: no packing)
    ("__half", 16, 64, 5, 40, 96, 1, 1),
    ("__nv_bfloat16", 16, 64, 13, 24, 192, 1, 1),
]


def random_case(dtype: str, bits: int, group: int, rows: int, n: int, k: int) -> dict:
    """Packed weights (q, scales, biases), or for bits 16 a half-precision weight w16 (scales and biases then stand
    in, unread), and x."""
    rng = np.random.default_rng(bits * 1000 + rows * 10 + n)
    if bits == 16:
        return {"w16": half_bits(rng.standard_normal((n, k)) * 0.05, dtype),
                "scales": np.zeros((n, 1), np.uint16), "biases": np.zeros((n, 1), np.uint16),
                "x": half_bits(rng.standard_normal((rows, k)), dtype)}
    return {"q": rng.integers(0, 2**bits, size=(n, k)),
            "scales": half_bits(rng.uniform(0.01, 0.05, size=(n, k // group)), dtype),
            "biases": half_bits(rng.uniform(-0.4, 0.0, size=(n, k // group)), dtype),
            "x": half_bits(rng.standard_normal((rows, k)), dtype)}


def run(lib: ctypes.CDLL, case: dict, bits: int, outputs: int) -> np.ndarray:
    """The kernel's output bits [rows, outputs] (and, where the case has a delta, case["added"] filled; where it has
    heads, case["q_out"], case["k_out"], case["v_out"])."""
    x = case["x"]
    packed = case["w16"] if bits == 16 else pack(case["q"], bits)  # the weight as the kernel reads it
    out = np.zeros((x.shape[0], outputs), dtype=np.uint16)
    delta, norm_weight = case.get("delta", x), case.get("norm_weight", x)
    case["added"] = np.zeros_like(x)
    # x as the launch hands it over, in its own leading dimensions (a [1, rows, K] sequence unless the case says)
    x_shape = np.array(case.get("x_view", (1, *x.shape)), dtype=np.int32)
    assert np.prod(x_shape) == x.size
    w_shape = np.array(packed.shape, dtype=np.int32)
    q_weight, k_weight = case.get("q_weight", x), case.get("k_weight", x)
    inverse_frequencies = case.get("inverse_frequencies", np.zeros(1, np.float32))
    offsets = case.get("offsets", np.zeros(1, np.int32))
    offsets_shape = np.array(offsets.shape, dtype=np.int32)
    for name in ("q_out", "k_out", "v_out"):
        case[name] = np.zeros(case.get(name + "_shape", (1,)), dtype=np.uint16)
    ptr = ctypes.c_void_p
    before = [ptr(a.ctypes.data) for a in (x, x_shape)]
    after = [ptr(a.ctypes.data) for a in (delta, norm_weight, packed, w_shape, case["scales"], case["biases"], out,
                                          case["added"], q_weight, k_weight, inverse_frequencies, offsets,
                                          offsets_shape, case["q_out"], case["k_out"], case["v_out"])]
    lib.run(*before, ctypes.c_int(len(x_shape)), *after)
    return out


def weight_values(case: dict, dtype: str, bits: int, group: int) -> np.ndarray:
    """W as the kernel multiplies it: each scaled weight rounded to x's dtype (as MLX's dequantize does), or the
    half-precision weight itself."""
    if bits == 16:
        return half_values(case["w16"], dtype).astype(np.float64)
    q, scales, biases = case["q"], case["scales"], case["biases"]
    n, k = q.shape
    weights = (q.reshape(n, -1, group) * half_values(scales, dtype)[..., None].astype(np.float64)
               + half_values(biases, dtype)[..., None]).reshape(n, k)
    return half_values(half_bits(weights.astype(np.float32), dtype), dtype).astype(np.float64)


@pytest.mark.parametrize("dtype, bits, group, rows, n, k, warps, passes", CASES)
def test_the_tensor_core_product_lanes_meet_the_right_weights(tmp_path, dtype, bits, group, rows, n, k, warps,
                                                              passes):
    lib = build(tmp_path, dtype, bits, group, rows, warps, passes)
    case = random_case(dtype, bits, group, rows, n, k)
    if rows % 2:
        case["x_view"] = (rows, k)  # x handed over flat, as a caller with [rows, K] does; the others [1, rows, K]
    got = half_values(run(lib, case, bits, n), dtype)

    weights = weight_values(case, dtype, bits, group)
    want = half_values(case["x"], dtype).astype(np.float64) @ weights.T
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    # And not by luck: each output's error is within the final rounding to x's dtype.
    assert np.abs(got - want).max() <= 2 ** -7 * np.abs(want).max() + 1e-6


GATED_CASES = [  # dtype, bits, group, rows of x, n (gate + up rows), k, warps, segments a pass
    ("__nv_bfloat16", 4, 64, 1, 64, 256, 4, 1),
    ("__nv_bfloat16", 4, 32, 3, 44, 96, 2, 1),     # 22 outputs: a partial tile of 8
    ("__nv_bfloat16", 8, 64, 9, 32, 192, 1, 2),    # two 8-row tiles of x
    ("__half", 4, 128, 5, 48, 256, 2, 1),
    ("__nv_bfloat16", 16, 64, 3, 44, 96, 2, 1),
]


@pytest.mark.parametrize("dtype, bits, group, rows, n, k, warps, passes", GATED_CASES)
def test_the_gated_product_is_the_product_then_the_gated_silu(tmp_path, dtype, bits, group, rows, n, k, warps,
                                                               passes):
    """GATED: the same sums as the plain product of the stacked [gate; up] weight, each output silu(gate) * up."""
    case = random_case(dtype, bits, group, rows, n, k)
    plain = half_values(run(build(tmp_path / "plain", dtype, bits, group, rows, warps, passes), case, bits, n), dtype)
    got = half_values(run(build(tmp_path / "gated", dtype, bits, group, rows, warps, passes, gated=True), case,
                          bits, n // 2), dtype)

    def rounded(a):  # to the kernel's half type, as each of MLX's functors rounds its result
        return half_values(half_bits(np.asarray(a, dtype=np.float32), dtype), dtype)

    gate, up = plain[:, : n // 2], plain[:, n // 2:]
    with np.errstate(over="ignore"):  # a large negative gate: exp overflows to inf, the sigmoid to 0, as in float
        want = rounded(rounded(gate * rounded(1 / (1 + np.exp(-gate)))) * up)
    # One unit in the last place of the type at most (the sigmoid's float exp on two sides).
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)
    assert np.abs(want).max() > 0.1  # a real signal, not zeros on both sides


NORMED_CASES = [  # dtype, bits, group, rows of x, n, k, warps, segments a pass, with a delta, gated
    ("__nv_bfloat16", 4, 64, 1, 32, 256, 4, 1, True, False),
    ("__nv_bfloat16", 4, 64, 1, 32, 256, 4, 1, False, False),   # the first layer: no delta
    ("__nv_bfloat16", 4, 32, 3, 44, 96, 2, 1, True, True),      # gated, a partial tile
    ("__nv_bfloat16", 8, 64, 9, 24, 192, 1, 2, True, False),    # two 8-row tiles of x
    ("__half", 4, 128, 5, 48, 256, 2, 1, True, False),
    ("__nv_bfloat16", 4, 64, 2, 32, 1024, 8, 1, True, True),    # 8 warps stage and scale the rows together
    ("__nv_bfloat16", 16, 64, 2, 32, 256, 4, 1, True, True),    # half-precision weights
]


@pytest.mark.parametrize("dtype, bits, group, rows, n, k, warps, passes, add, gated", NORMED_CASES)
def test_the_normed_product_is_the_add_and_norm_then_the_product(tmp_path, dtype, bits, group, rows, n, k, warps,
                                                                 passes, add, gated):
    """MLXR_NORMED: the plain kernel's output for x' = RMSNorm(x + delta) made as MLX's rms_norm makes it (h rounded
    to the type, h * normalizer rounded, times the weight rounded), and x + delta written to `added`."""
    eps = 1e-6
    case = random_case(dtype, bits, group, rows, n, k)
    rng = np.random.default_rng(rows + n)
    case["delta"] = half_bits(rng.standard_normal((rows, k)), dtype) if add else case["x"]
    case["norm_weight"] = half_bits(rng.uniform(0.5, 1.5, size=k), dtype)
    outputs = n // 2 if gated else n
    got = run(build(tmp_path / "normed", dtype, bits, group, rows, warps, passes, gated=gated, normed=True, add=add,
                    eps=eps), case, bits, outputs)

    def rounded(a):
        return half_values(half_bits(np.asarray(a, dtype=np.float32), dtype), dtype)

    h = half_values(case["x"], dtype) + (half_values(case["delta"], dtype) if add else 0)
    h = rounded(h) if add else h
    normalizer = 1 / np.sqrt((h.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + eps)
    normed = rounded(half_values(case["norm_weight"], dtype) * rounded(h * normalizer))
    plain_case = {**case, "x": half_bits(normed, dtype)}
    want = run(build(tmp_path / "plain", dtype, bits, group, rows, warps, passes, gated=gated), plain_case, bits,
               outputs)
    got_values, want_values = half_values(got, dtype), half_values(want, dtype)
    assert np.abs(want_values).max() > 0.01
    # The normalizer's float sum runs in another order than numpy's, so a normed element could round the other way
    # (a ~2^-16 chance each); the outputs are otherwise the same bits.
    assert np.mean(got == want) >= 0.95
    np.testing.assert_allclose(got_values, want_values, rtol=2 ** -6, atol=2 ** -6 * np.abs(want_values).max())
    if add:
        np.testing.assert_array_equal(case["added"], half_bits(h, dtype))


HEADS_CASES = [  # dtype, bits, group, sequences, tokens, q heads, kv heads, head dim, k, warps, passes, delta,
    # q/k norms, traditional RoPE
    ("__nv_bfloat16", 4, 64, 1, 1, 4, 2, 32, 128, 2, 2, True, True, False),   # a Qwen3-like decode step
    ("__nv_bfloat16", 4, 32, 3, 1, 2, 1, 64, 96, 1, 1, True, False, False),   # 3 sequences at their own positions
    ("__nv_bfloat16", 8, 64, 1, 5, 2, 2, 16, 192, 2, 1, False, True, True),   # 5 tokens of one sequence
    ("__half", 4, 128, 2, 2, 2, 1, 32, 256, 2, 1, True, True, False),
    ("__nv_bfloat16", 16, 64, 1, 1, 4, 2, 32, 128, 2, 2, True, True, False),   # half-precision weights
    ("__half", 16, 64, 2, 2, 2, 1, 32, 256, 2, 1, True, True, False),
]


@pytest.mark.parametrize("dtype, bits, group, b, t, hq, hkv, d, k, warps, passes, add, qk_norm, traditional",
                         HEADS_CASES)
def test_the_heads_variant_is_the_normed_product_then_the_qk_norms_and_rope(tmp_path, dtype, bits, group, b, t, hq,
                                                                           hkv, d, k, warps, passes, add, qk_norm,
                                                                           traditional):
    """MLXR_HEADS: the normed q|k|v product's heads, q and k given their per-head RMSNorm and RoPE as
    nn/cuda_norm_rope.cpp's kernel gives them (norm output rounded, float angles), written heads first."""
    eps, heads = 1e-6, hq + 2 * hkv
    rows, n = b * t, heads * d
    case = random_case(dtype, bits, group, rows, n, k)
    rng = np.random.default_rng(b * 100 + t * 10 + d)
    case["delta"] = half_bits(rng.standard_normal((rows, k)), dtype) if add else case["x"]
    case["norm_weight"] = half_bits(rng.uniform(0.5, 1.5, size=k), dtype)
    case["q_weight"] = half_bits(rng.uniform(0.5, 1.5, size=d), dtype)
    case["k_weight"] = half_bits(rng.uniform(0.5, 1.5, size=d), dtype)
    case["inverse_frequencies"] = (1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    case["offsets"] = np.array([7] if b == 1 else [3 + 11 * i for i in range(b)], dtype=np.int32)
    case["q_out_shape"], case["k_out_shape"], case["v_out_shape"] = (b, hq, t, d), (b, hkv, t, d), (b, hkv, t, d)
    case["x_view"] = (b, t, k)  # as the decoder hands x over: [sequences, tokens, K]
    split = {"head_dim": d, "q_heads": hq, "kv_heads": hkv, "traditional": traditional,
             "qk_norm": qk_norm, "qk_eps": eps}
    run(build(tmp_path / "heads", dtype, bits, group, rows, warps, passes, add=add, eps=eps, heads=split), case, bits,
        n)
    # The product of the normed input, as the normed variant makes it.
    product_case = {key: case[key] for key in ("q", "w16", "scales", "biases", "x", "delta", "norm_weight")
                    if key in case}
    product = half_values(run(build(tmp_path / "normed", dtype, bits, group, rows, warps, passes, normed=True,
                                    add=add, eps=eps), product_case, bits, n), dtype)
    product = product.reshape(b, t, heads, d).transpose(0, 2, 1, 3)  # [B, heads, T, D]

    def rounded(a):
        return half_values(half_bits(np.asarray(a, dtype=np.float32), dtype), dtype)

    def rotated(x, weight):
        if qk_norm:
            normalizer = (1 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)).astype(np.float32)
            x = rounded(half_values(weight, dtype) * rounded(x * normalizer))
        half = d // 2
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if traditional else (x[..., :half], x[..., half:])
        positions = (case["offsets"] if b > 1 else np.repeat(case["offsets"], b))[:, None] + np.arange(t)
        theta = positions.astype(np.float32)[:, None, :, None] * case["inverse_frequencies"]
        c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
        out = np.empty_like(x)
        first, second = rounded(x1 * c - x2 * s), rounded(x1 * s + x2 * c)
        if traditional:
            out[..., 0::2], out[..., 1::2] = first, second
        else:
            out[..., :half], out[..., half:] = first, second
        return out

    want = {"q_out": rotated(product[:, :hq], case["q_weight"]),
            "k_out": rotated(product[:, hq:hq + hkv], case["k_weight"]),
            "v_out": product[:, hq + hkv:]}
    np.testing.assert_array_equal(case["v_out"], half_bits(want["v_out"], dtype))  # values as the product made them
    for name in ("q_out", "k_out"):
        got = half_values(case[name], dtype)
        assert np.abs(want[name]).max() > 0.01
        # The norm's float sum runs in another order than numpy's, and the angles' cos / sin may differ in the last
        # place, so an element could round the other way; the outputs are otherwise the same bits.
        assert np.mean(case[name] == half_bits(want[name], dtype)) >= 0.95, name
        np.testing.assert_allclose(got, want[name], rtol=2 ** -6, atol=2 ** -6 * np.abs(want[name]).max())
    if add:
        h = rounded(half_values(case["x"], dtype) + half_values(case["delta"], dtype))
        np.testing.assert_array_equal(case["added"], half_bits(h, dtype))


def test_a_product_of_few_tiles_gets_more_warps_a_tile():
    """The launch's warps a tile (nn/cuda_matvec.cpp): 4 for a tall weight, doubled up to 16 while the product has
    few warps in all and each warp keeps two 64-byte segments of a row."""
    from mlxrunner import _core

    words = {2560: 320, 4096: 512, 9728: 1216}  # uint32 words a row of a 4-bit weight of these columns
    assert _core.matvec_warps_per_tile(19456, words[2560], gated=True) == 4   # Qwen3-4B's gate|up: 1,216 tiles
    assert _core.matvec_warps_per_tile(151936, words[2560]) == 4              # a vocabulary head
    assert _core.matvec_warps_per_tile(2560, words[4096]) == 16               # Qwen3-4B's o: 160 tiles, 32 segments
    assert _core.matvec_warps_per_tile(2560, words[9728]) == 16               # its down projection
    assert _core.matvec_warps_per_tile(2560, 64) == 4                         # 4 segments a row: no warp would keep 2
    assert _core.matvec_warps_per_tile(2560, 256) == 8                        # 16 segments: 8 warps keep 2 each
