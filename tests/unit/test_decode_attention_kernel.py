"""The decode attention kernels (csrc/nn/cuda_decode_attention.cpp), run on this machine's CPU.

Their sources, as MLX receives them (compacted), are compiled as host C++ with every thread of a block a std::thread
(tests/unit/cuda_emulator.py). Checked against numpy's softmax(q k^T scale) v over keys 0..position, where the key and
value at `position` are the step's own (k and v, read through their strides, as the decoder's values are a strided
view of the q|k|v product): the slot holds garbage before the kernel runs, which must write the step's key and value
there and touch no other slot. Splits from one to many (their parts merged by the second kernel), grouped queries,
splits with fewer keys than the warps; the merge kernel alone over more splits than one of its stages holds. What this
cannot check, tests/gpu/test_decode_attention.py does on CUDA: NVRTC's view of the sources, the real warps, and a
decoder's greedy tokens with it on and off.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import (
    NN,
    PRELUDE,
    block_launcher,
    build_qk_rope,
    compile_library,
    from_bf16_bits,
    kernel_source,
    to_bf16_bits,
)

SOURCE = NN / "cuda_decode_attention.cpp"
THREADS = 128  # the parts kernel's block (kThreads)
KEYS_PER_SPLIT, MOST_SPLITS = 16, 64  # as the host code chooses the splits (kKeysPerSplit, kMostSplits)


def splits_for(length: int, keys_per_split: int = KEYS_PER_SPLIT) -> int:
    """As the host code (splits_for; keys_per_split: MLXRUNNER_DECODE_SPLIT_KEYS)."""
    wanted = min(max(-(-length // keys_per_split), 1), MOST_SPLITS)
    chunk = -(-length // wanted)
    return -(-length // chunk)


# The decode step's inputs and its parts, as the kernels' parameters (MLX passes each input's strides or shape where
# the source reads them).
STEP_INPUTS = ("const T* q, const long long* q_strides, const T* k, const long long* k_strides, const T* v, "
               "const long long* v_strides, const T* keys, const int* keys_shape, const T* values, const int* position")
STEP_PARTS = "float* part_acc, float* part_max, float* part_sum"


def constants_of(d: int, q_heads: int, kv_heads: int, scale: float) -> str:
    """The template arguments MLX declares: T, D, Q_HEADS, KV_HEADS and SCALE_BITS (the scale's float bits)."""
    scale_bits = int(np.array(scale, dtype=np.float32).view(np.int32))
    return (f"using T = __nv_bfloat16;\nconstexpr int D = {d}, Q_HEADS = {q_heads}, KV_HEADS = {kv_heads}, "
            f"SCALE_BITS = {scale_bits};\n")


def names(params: str) -> str:
    return ", ".join(param.split()[-1].lstrip("*") for param in params.split(", "))


PLAIN = {"MLXR_ROPE": False, "MLXR_NORM": False}  # the parts kernel's switches: q and k come rotated


def build(tmp_path: Path, d: int, q_heads: int, kv_heads: int, scale: float):
    """The parts kernel as a library, run(blocks, q, q_strides, k, k_strides, v, v_strides, keys, keys_shape, values,
    position, part_acc, part_max, part_sum), and the merge kernel, run(blocks, part_acc, part_max, part_max_shape,
    part_sum, out)."""
    constants = constants_of(d, q_heads, kv_heads, scale)
    parts_params = f"{STEP_INPUTS}, {STEP_PARTS}"
    parts_args = names(parts_params)
    merge_params = ("const float* part_acc, const float* part_max, const int* part_max_shape, const float* part_sum, "
                    "T* out")
    merge_args = names(merge_params)
    parts = (PRELUDE + constants +
             f"static void kernel({parts_params}) {{\n{kernel_source(SOURCE, 'kDecodeAttentionParts', PLAIN)}\n}}\n")
    merge_body = kernel_source(SOURCE, "kDecodeAttentionMerge")
    merge = PRELUDE + constants + f"static void kernel({merge_params}) {{\n{merge_body}\n}}\n"
    return (compile_library(tmp_path / "parts", parts + block_launcher(f"int blocks, {parts_params}", parts_args,
                                                                     "blocks", THREADS)),
            compile_library(tmp_path / "merge", merge + block_launcher(f"int blocks, {merge_params}", merge_args,
                                                                       "blocks", d)))


def element_strides(a: np.ndarray) -> np.ndarray:
    return np.array([s // a.itemsize for s in a.strides], np.int64)


CASES = [  # head dim, query heads, key/value heads, position (the step's slot), capacity, keys a split at least
    (128, 4, 1, 0, 256, 16),      # the first position: one key, one split, three warps with nothing to do
    (64, 8, 4, 37, 64, 64),       # MLXRUNNER_DECODE_SPLIT_KEYS=64: one split of 38 keys, warps with a partial run
    (128, 32, 8, 300, 512, 64),   # 5 splits, four query heads a key head (Llama 3 8B's grouping)
    (64, 16, 8, 1023, 1024, 16),  # the most splits (64), the buffer's last slot
    (128, 32, 8, 150, 256, 16),   # 10 splits of 15 keys: one run a warp, the last short
]


@pytest.mark.parametrize("d, q_heads, kv_heads, position, capacity, keys_per_split", CASES)
def test_the_step_attends_to_its_keys_and_writes_its_slot(tmp_path, d, q_heads, kv_heads, position, capacity,
                                                           keys_per_split):
    rng = np.random.default_rng(d + q_heads + position)
    scale = 1 / np.sqrt(d)
    q = to_bf16_bits(rng.standard_normal((1, q_heads, 1, d)))
    # k heads-first as the RoPE kernel writes it; v a strided view of a [1, 1, heads, D] projection, as the decoder's
    k = to_bf16_bits(rng.standard_normal((1, kv_heads, 1, d)) * 2)
    v_projection = to_bf16_bits(rng.standard_normal((1, 1, 3 * kv_heads, d)))
    v = v_projection[:, :, kv_heads : 2 * kv_heads].transpose(0, 2, 1, 3)
    keys = to_bf16_bits(rng.standard_normal((1, kv_heads, capacity, d)) * 2)
    values = to_bf16_bits(rng.standard_normal((1, kv_heads, capacity, d)))
    keys_before, values_before = keys.copy(), values.copy()
    length = position + 1
    splits = splits_for(length, keys_per_split)
    part_acc = np.zeros((q_heads, splits, d), np.float32)
    part_max = np.zeros((q_heads, splits), np.float32)
    part_sum = np.zeros((q_heads, splits), np.float32)
    out = np.zeros((1, 1, q_heads * d), np.uint16)
    keys_shape = np.array(keys.shape, np.int32)
    part_max_shape = np.array(part_max.shape, np.int32)
    at = np.array([position], np.int32)
    strides = [element_strides(a) for a in (q, k, v)]
    ptr = ctypes.c_void_p
    # v's pointer is its first element inside the projection, as MLX hands a view's data over
    v_first = v_projection.ctypes.data + kv_heads * d * v_projection.itemsize
    inputs = [q.ctypes.data, strides[0].ctypes.data, k.ctypes.data, strides[1].ctypes.data, v_first,
              strides[2].ctypes.data, keys.ctypes.data, keys_shape.ctypes.data, values.ctypes.data, at.ctypes.data]
    parts_out = [part_acc.ctypes.data, part_max.ctypes.data, part_sum.ctypes.data]
    parts, merge = build(tmp_path, d, q_heads, kv_heads, scale)
    parts.run(ctypes.c_int(kv_heads * splits), *[ptr(x) for x in inputs + parts_out])
    merge.run(ctypes.c_int(q_heads), *[ptr(a.ctypes.data) for a in (part_acc, part_max, part_max_shape, part_sum, out)])
    # The step's slot now holds its key and value; every other slot is as it was.
    np.testing.assert_array_equal(keys[0, :, position], k[0, :, 0])
    np.testing.assert_array_equal(values[0, :, position], v[0, :, 0])
    others = np.arange(capacity) != position
    np.testing.assert_array_equal(keys[:, :, others], keys_before[:, :, others])
    np.testing.assert_array_equal(values[:, :, others], values_before[:, :, others])

    got = from_bf16_bits(out).reshape(q_heads, d)
    group = q_heads // kv_heads
    for h in range(q_heads):
        key_list = from_bf16_bits(keys[0, h // group, :length]).astype(np.float64)
        value_list = from_bf16_bits(values[0, h // group, :length]).astype(np.float64)
        query = np.float32(scale) * from_bf16_bits(q[0, h, 0]).astype(np.float64)
        scores = key_list @ query
        weights = np.exp(scores - scores.max())
        want = (weights / weights.sum()) @ value_list
        # float sums in another order, then one rounding to bfloat16
        np.testing.assert_allclose(got[h], want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max() + 1e-6)
    assert np.abs(got).max() > 0.05  # a real signal


@pytest.mark.parametrize("splits", [7, 64, 150])
def test_the_merge_rescales_every_split_to_the_largest_maximum(tmp_path, splits):
    """The merge kernel alone: one stage of its shared maxima (7, 64 splits) or three (150, as a chunk's splits of a
    long cache may be), rows whose first splits saw no key (-inf maxima, as a chunk row's splits past its position),
    including a whole first stage of them, against numpy's softmax merge."""
    rng = np.random.default_rng(splits)
    d, rows = 64, 4
    part_max = rng.normal(0, 4, (rows, splits)).astype(np.float32)
    part_max[1, : splits // 2] = -np.inf
    part_max[2, : max(splits - 3, 1)] = -np.inf  # with 150 splits: two whole stages unseen
    part_sum = np.where(np.isinf(part_max), 0, rng.uniform(0.5, 20, (rows, splits))).astype(np.float32)
    part_acc = (rng.standard_normal((rows, splits, d)) * part_sum[..., None]).astype(np.float32)
    out = np.zeros((1, rows, d), np.uint16)
    _, merge = build(tmp_path, d, rows, 1, 1.0)
    part_max_shape = np.array(part_max.shape, np.int32)  # held while the kernel runs
    merge.run(ctypes.c_int(rows), *[ctypes.c_void_p(a.ctypes.data) for a in
                                    (part_acc, part_max, part_max_shape, part_sum, out)])
    got = from_bf16_bits(out).reshape(rows, d)
    weight = np.exp(part_max.astype(np.float64) - part_max.max(axis=1, keepdims=True))
    want = (weight[..., None] * part_acc).sum(axis=1) / (weight * part_sum).sum(axis=1, keepdims=True)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())


# --- the parts kernel that makes the q/k norms and RoPE itself (MLXR_ROPE), against the q/k kernel then the parts ---

EPS = 1e-6


def rope_constants(traditional: bool) -> str:
    eps_bits = int(np.array(EPS, np.float32).view(np.int32))
    return f"constexpr bool TRADITIONAL = {str(traditional).lower()};\nconstexpr int EPS_BITS = {eps_bits};\n"


def build_roped_parts(tmp_path: Path, d: int, q_heads: int, kv_heads: int, scale: float, norm: bool,
                      traditional: bool):
    """The parts kernel with MLXR_ROPE (and MLXR_NORM): run(blocks, <the step's inputs>, inverse_frequencies,
    q_weight, k_weight, <its parts>)."""
    params = f"{STEP_INPUTS}, const float* inverse_frequencies, const T* q_weight, const T* k_weight, {STEP_PARTS}"
    body = kernel_source(SOURCE, "kDecodeAttentionParts", {"MLXR_ROPE": True, "MLXR_NORM": norm})
    code = (PRELUDE + kernel_source(NN / "cuda_norm_rope.h", "kCudaHeadNormRope") +
            constants_of(d, q_heads, kv_heads, scale) + rope_constants(traditional) +
            f"static void kernel({params}) {{\n{body}\n}}\n")
    return compile_library(tmp_path / f"roped-{int(norm)}{int(traditional)}",
                           code + block_launcher(f"int blocks, {params}", names(params), "blocks", THREADS))


@pytest.mark.parametrize("d, q_heads, kv_heads, position, norm, traditional", [
    (128, 32, 8, 150, False, False),  # Llama 3 8B's heads: RoPE alone, 10 splits
    (128, 16, 8, 300, True, False),   # Qwen3's per-head norms, then RoPE
    (64, 8, 4, 37, True, True),       # interleaved pairs, one split
])
def test_the_roped_kernel_gives_the_qk_kernel_then_the_parts_kernels_bits(tmp_path, d, q_heads, kv_heads, position,
                                                                          norm, traditional):
    """q and k as projected (strided views of one q|k|v row): the kernel that norms and rotates them itself writes the
    same key into the cache and gives the same attention, bit for bit, as the q/k kernel followed by the parts kernel
    (and the same merge)."""
    rng = np.random.default_rng(d + position)
    scale = 1 / np.sqrt(d)
    capacity = position + 9
    qkv = to_bf16_bits(3 * rng.standard_normal((1, 1, q_heads + 2 * kv_heads, d)))
    q_weight = to_bf16_bits(1 + 0.1 * rng.standard_normal(d))
    k_weight = to_bf16_bits(1 + 0.1 * rng.standard_normal(d))
    frequencies = (1.0 / 500000.0 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    at = np.array([position], np.int32)
    cache = to_bf16_bits(rng.standard_normal((2, 1, kv_heads, capacity, d)))
    heads_first = qkv.transpose(0, 2, 1, 3)  # [1, heads, 1, D] views of the row, as the decoder's head_range
    q_raw, k_raw, v = heads_first[:, :q_heads], heads_first[:, q_heads:q_heads + kv_heads], heads_first[:, -kv_heads:]
    splits = splits_for(position + 1)
    ptr = ctypes.c_void_p

    def attend(q, k, roped: bool):
        keys, values = cache[0].copy(), cache[1].copy()
        part_acc = np.zeros((q_heads, splits, d), np.float32)
        part_max = np.zeros((q_heads, splits), np.float32)
        part_sum = np.zeros((q_heads, splits), np.float32)
        out = np.zeros((1, 1, q_heads * d), np.uint16)
        strides = [element_strides(a) for a in (q, k, v)]
        keys_shape, part_max_shape = np.array(keys.shape, np.int32), np.array(part_max.shape, np.int32)
        first = [a.__array_interface__["data"][0] for a in (q, k, v)]  # a view's first element, as MLX hands it over
        inputs = [first[0], strides[0].ctypes.data, first[1], strides[1].ctypes.data, first[2], strides[2].ctypes.data,
                  keys.ctypes.data, keys_shape.ctypes.data, values.ctypes.data, at.ctypes.data]
        parts_out = [part_acc.ctypes.data, part_max.ctypes.data, part_sum.ctypes.data]
        plain, merge = build(tmp_path / "plain", d, q_heads, kv_heads, scale)
        if roped:
            kernel = build_roped_parts(tmp_path, d, q_heads, kv_heads, scale, norm, traditional)
            extra = [frequencies.ctypes.data, q_weight.ctypes.data, k_weight.ctypes.data]
            kernel.run(ctypes.c_int(kv_heads * splits), *[ptr(x) for x in inputs + extra + parts_out])
        else:
            plain.run(ctypes.c_int(kv_heads * splits), *[ptr(x) for x in inputs + parts_out])
        merge.run(ctypes.c_int(q_heads), *[ptr(a.ctypes.data) for a in (part_acc, part_max, part_max_shape, part_sum,
                                                                         out)])
        return out, keys, values

    q_out = np.zeros((1, q_heads, 1, d), np.uint16)
    k_out = np.zeros((1, kv_heads, 1, d), np.uint16)
    v_out = np.zeros((1, kv_heads, 1, d), np.uint16)
    arrays = [qkv, np.array(qkv.shape, np.int32), q_weight, k_weight, frequencies, at, np.array([1], np.int32), q_out,
              k_out, v_out]  # held by the list while the kernel runs
    qk_constants = constants_of(d, q_heads, kv_heads, 1.0) + rope_constants(traditional)
    build_qk_rope(tmp_path / f"qk-{int(norm)}{int(traditional)}", qk_constants, norm).run(
        ctypes.c_int(-(-(q_heads + 2 * kv_heads) // 4)), *[ptr(a.ctypes.data) for a in arrays])
    np.testing.assert_array_equal(v_out, v)  # the value heads, copied heads first
    two_kernels, keys_two, values_two = attend(q_out, k_out, roped=False)
    roped, keys_roped, values_roped = attend(q_raw, k_raw, roped=True)
    np.testing.assert_array_equal(keys_roped[0, :, position], k_out[0, :, 0])
    np.testing.assert_array_equal(keys_roped, keys_two)
    np.testing.assert_array_equal(values_roped, values_two)
    np.testing.assert_array_equal(roped, two_kernels)
    assert not np.array_equal(k_out[0, :, 0], k_raw[0, :, 0])  # the rotation did something


# --- the chunk kernel (kChunkAttentionParts): several new tokens at once, on emulated tensor cores -------------------

HOST_MMA = r"""
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __nv_bfloat16) {
  emulated_mma<__nv_bfloat16>(d, a, b);
}
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __half) {
  emulated_mma<__half>(d, a, b);
}
"""
HOST_COPIES = r"""
// cp.async as a plain copy (the block's barrier after the wait is what orders it on the GPU as here)
__device__ __forceinline__ void copy_16_async(void* shared, const void* global) { std::memcpy(shared, global, 16); }
__device__ __forceinline__ void commit_async_copies() {}
template <int N>
__device__ __forceinline__ void wait_async_copies() {}
// ldmatrix .x4 .trans: the warp's 32 row addresses meet, then each lane takes its pairs (PTX's fragment layout)
static const void* matrix_rows[32][32];
__device__ __forceinline__ void load_tiles_transposed(unsigned (&r)[4], const void* row) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  matrix_rows[warp][lane] = row;
  warps_tiles[warp].meet->arrive_and_wait();
  const int pair = lane & 3, column = lane >> 2;
  for (int m = 0; m < 4; ++m) {
    const auto* lo = static_cast<const uint16_t*>(matrix_rows[warp][8 * m + 2 * pair]);
    const auto* hi = static_cast<const uint16_t*>(matrix_rows[warp][8 * m + 2 * pair + 1]);
    r[m] = lo[column] | (static_cast<unsigned>(hi[column]) << 16);
  }
  warps_tiles[warp].meet->arrive_and_wait();
}
"""
CHUNK_ROWS, CHUNK_KEYS, CHUNK_BLOCKS = 64, 64, 384  # kChunkRows, kChunkKeys (a split's multiple), kChunkBlocks


def chunk_splits_for(length: int, blocks_a_split: int) -> int:
    """As the host code chooses the chunk kernel's splits (chunk_splits_for)."""
    def ceil_div(a: int, b: int) -> int:
        return (a + b - 1) // b

    wanted = min(max(ceil_div(CHUNK_BLOCKS, blocks_a_split), 1), ceil_div(length, CHUNK_KEYS))
    chunk = ceil_div(ceil_div(length, wanted), CHUNK_KEYS) * CHUNK_KEYS
    return ceil_div(length, chunk)


def build_chunk(tmp_path: Path, d: int, q_heads: int, kv_heads: int, scale: float,
                rope: tuple[bool, bool] | None = None):
    """The chunk kernel as a library: run(blocks, q, q_shape, q_strides, k, k_strides, v, v_strides, keys, keys_shape,
    values, position, part_acc, part_max, part_sum); its helpers' asm functions (mma, cp.async) give way to
    emulations (ldmatrix's a warp's meeting, as the mma's). With rope = (norm, traditional), the variant that reads
    the heads from the q|k|v product itself and makes the q/k norms and RoPE (MLXR_ROPE): run(blocks, qkv, qkv_shape,
    keys, keys_shape, values, position, inverse_frequencies, q_weight, k_weight, part_acc, part_max, part_sum)."""
    import re

    helpers = kernel_source(SOURCE, "kChunkAttentionHelpers")
    # its asynchronous copies come from kCudaAsyncCopies, which the host code puts before the helpers (as kCudaMma):
    # HOST_COPIES emulates those three
    common = kernel_source(SOURCE.parent / "cuda_kernel_common.h", "kCudaAsyncCopies")
    assert all(name in common for name in ("copy_16_async", "commit_async_copies", "wait_async_copies"))
    helpers, count = re.subn(r"__device__ __forceinline__ void load_tiles_transposed\(.*?\n}\n", "", helpers,
                             flags=re.S)
    assert count == 1, "the helpers' ldmatrix function was not found"
    # the emulated mma in place of the asm one the host code puts before the helpers (kCudaMma)
    helpers = HOST_MMA + helpers.replace("namespace mlxr_chunk {", "namespace mlxr_chunk {\n" + HOST_COPIES, 1)
    constants = constants_of(d, q_heads, kv_heads, scale)
    if rope:
        params = ("const T* qkv, const int* qkv_shape, const T* keys, const int* keys_shape, const T* values, "
                  "const int* position, const float* inverse_frequencies, const T* q_weight, const T* k_weight, "
                  "float* part_acc, float* part_max, float* part_sum")
    else:
        params = ("const T* q, const int* q_shape, const long long* q_strides, const T* k, const long long* k_strides, "
                  "const T* v, const long long* v_strides, const T* keys, const int* keys_shape, const T* values, "
                  "const int* position, float* part_acc, float* part_max, float* part_sum")
    switches = {"MLXR_ROPE": rope is not None, "MLXR_NORM": bool(rope and rope[0])}
    if rope:
        helpers += kernel_source(NN / "cuda_norm_rope.h", "kCudaHeadNormRope")
        constants += rope_constants(rope[1])
    code = (PRELUDE + helpers + constants +
            f"static void kernel({params}) {{\n{kernel_source(SOURCE, 'kChunkAttentionParts', switches)}\n}}\n" +
            block_launcher(f"int blocks, {params}", names(params), "blocks", THREADS))
    name = "chunk" if rope is None else f"chunk-roped-{int(rope[0])}{int(rope[1])}"
    return compile_library(tmp_path / name, code)


CHUNK_CASES = [  # head dim, query heads, key/value heads, tokens, offset (positions already held), capacity, splits,
    # q's and k's elements along the head dim consecutive (as the RoPE kernel writes them: k moved 16 bytes at a time,
    # q's pairs read as 4-byte words) or not
    (64, 4, 2, 5, 0, 256, None, True),      # a fresh cache: 10 rows, most of a warp's 16 empty; the host's splits (1)
    (128, 8, 2, 20, 37, 128, 3, True),      # 4 queries a key head: 80 rows over two query tiles; 3 one-tile splits
    (64, 16, 8, 7, 300, 512, None, False),  # 8 key heads, the host's splits (5 of 64 keys); q, k element by element
    (64, 2, 2, 64, 100, 256, 2, True),      # one query a key head: 64 rows, one tile; the last split past some rows
]


@pytest.mark.parametrize("d, q_heads, kv_heads, tokens, offset, capacity, splits, k_rows", CHUNK_CASES)
def test_a_chunk_attends_causally_to_the_cache_and_writes_its_slots(tmp_path, d, q_heads, kv_heads, tokens, offset,
                                                                    capacity, splits, k_rows):
    rng = np.random.default_rng(d + q_heads + tokens + offset)
    scale = 1 / np.sqrt(d)
    length = offset + tokens
    group = q_heads // kv_heads
    query_tiles = -(-(group * tokens) // CHUNK_ROWS)
    splits = splits or chunk_splits_for(length, kv_heads * query_tiles)
    # q a heads-first view of a tokens-first array; v a strided view of a [1, T, 3 kv_heads, D] projection
    q = to_bf16_bits(rng.standard_normal((1, tokens, q_heads, d))).transpose(0, 2, 1, 3)
    k = to_bf16_bits(rng.standard_normal((1, kv_heads, tokens, d)) * 2)
    if not k_rows:  # the same values held head dim first: views whose head-dim stride is not 1 (q's read elementwise)
        k = np.ascontiguousarray(k.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
        q = np.ascontiguousarray(q.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    v_projection = to_bf16_bits(rng.standard_normal((1, tokens, 3 * kv_heads, d)))
    v = v_projection[:, :, kv_heads : 2 * kv_heads].transpose(0, 2, 1, 3)
    keys = to_bf16_bits(rng.standard_normal((1, kv_heads, capacity, d)) * 2)
    values = to_bf16_bits(rng.standard_normal((1, kv_heads, capacity, d)))
    keys_before, values_before = keys.copy(), values.copy()
    rows = tokens * q_heads
    part_acc = np.zeros((rows, splits, d), np.float32)
    part_max = np.zeros((rows, splits), np.float32)
    part_sum = np.zeros((rows, splits), np.float32)
    out = np.zeros((1, tokens, q_heads * d), np.uint16)
    ptr = ctypes.c_void_p
    arrays = [q, np.array(q.shape, np.int32), element_strides(q), k, element_strides(k), v, element_strides(v), keys,
              np.array(keys.shape, np.int32), values, np.array([offset], np.int32), part_acc, part_max, part_sum]
    build_chunk(tmp_path, d, q_heads, kv_heads, scale).run(ctypes.c_int(kv_heads * query_tiles * splits),
                                                           *[ptr(a.ctypes.data) for a in arrays])
    _, merge = build(tmp_path, d, q_heads, kv_heads, scale)
    part_max_shape = np.array(part_max.shape, np.int32)  # held while the kernel runs
    merge.run(ctypes.c_int(rows), *[ptr(a.ctypes.data) for a in (part_acc, part_max, part_max_shape, part_sum, out)])

    # The chunk's slots now hold its keys and values; every other slot is as it was.
    new = slice(offset, length)
    np.testing.assert_array_equal(keys[0, :, new], k[0])
    np.testing.assert_array_equal(values[0, :, new], v[0])
    others = np.ones(capacity, bool)
    others[new] = False
    np.testing.assert_array_equal(keys[:, :, others], keys_before[:, :, others])
    np.testing.assert_array_equal(values[:, :, others], values_before[:, :, others])

    got = from_bf16_bits(out).reshape(tokens, q_heads, d)
    for t in range(tokens):
        for h in range(q_heads):
            seen = offset + t + 1  # token t sits at position offset + t and sees it and every position before
            key_list = from_bf16_bits(keys[0, h // group, :seen]).astype(np.float64)
            value_list = from_bf16_bits(values[0, h // group, :seen]).astype(np.float64)
            scores = key_list @ from_bf16_bits(q[0, h, t]).astype(np.float64) * np.float32(scale)
            weights = np.exp(scores - scores.max())
            want = (weights / weights.sum()) @ value_list
            # the probabilities rounded to bfloat16 for the second product (as flash attention does), float sums in
            # another order, then one rounding to bfloat16
            np.testing.assert_allclose(got[t, h], want, rtol=2 ** -6, atol=2 ** -6 * np.abs(want).max() + 1e-6,
                                       err_msg=f"token {t}, head {h}")
    assert np.abs(got).max() > 0.05  # a real signal


@pytest.mark.parametrize("d, q_heads, kv_heads, tokens, offset, norm, traditional", [
    (128, 8, 2, 24, 100, True, False),  # Qwen3's per-head norms then RoPE; 96 query rows over two tiles
    (128, 4, 4, 9, 300, False, False),  # Llama's RoPE alone, one query a key head, the host's splits (several)
    (64, 8, 4, 7, 0, True, True),       # interleaved pairs, a fresh cache
])
def test_the_roped_chunk_kernel_gives_the_qk_kernel_then_the_chunk_kernels_bits(tmp_path, d, q_heads, kv_heads,
                                                                                tokens, offset, norm, traditional):
    """The q|k|v product as projected: the chunk kernel that reads its heads in place and norms and rotates q and k
    itself writes the same keys and values into the cache and gives the same attention, bit for bit, as the q/k kernel
    followed by the chunk kernel (and the same merge)."""
    rng = np.random.default_rng(d + tokens + offset)
    scale = 1 / np.sqrt(d)
    length = offset + tokens
    capacity = length + 5
    heads = q_heads + 2 * kv_heads
    qkv = to_bf16_bits(3 * rng.standard_normal((1, tokens, heads, d)))
    q_weight = to_bf16_bits(1 + 0.1 * rng.standard_normal(d))
    k_weight = to_bf16_bits(1 + 0.1 * rng.standard_normal(d))
    frequencies = (1.0 / 500000.0 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    at = np.array([offset], np.int32)
    cache = to_bf16_bits(rng.standard_normal((2, 1, kv_heads, capacity, d)))
    heads_first = qkv.transpose(0, 2, 1, 3)  # [1, heads, T, D] views of the rows, as the decoder's head_range
    k_raw, v = heads_first[:, q_heads:q_heads + kv_heads], heads_first[:, -kv_heads:]
    query_tiles = -(-(q_heads // kv_heads * tokens) // CHUNK_ROWS)
    splits = chunk_splits_for(length, kv_heads * query_tiles)
    rows = tokens * q_heads
    ptr = ctypes.c_void_p
    _, merge = build(tmp_path / "merge", d, q_heads, kv_heads, scale)

    def attend(q, k, rope):
        """The plain kernel over q and k (v the product's view), or with rope the product's kernel (q and k unused)."""
        keys, values = cache[0].copy(), cache[1].copy()
        part_acc = np.zeros((rows, splits, d), np.float32)
        part_max = np.zeros((rows, splits), np.float32)
        part_sum = np.zeros((rows, splits), np.float32)
        out = np.zeros((1, tokens, q_heads * d), np.uint16)
        if rope:
            product = np.ascontiguousarray(qkv).reshape(1, tokens, heads * d)  # the projection's rows as they are
            arrays = [product, np.array(product.shape, np.int32), keys, np.array(keys.shape, np.int32), values, at,
                      frequencies, q_weight, k_weight]
        else:
            arrays = [q, np.array(q.shape, np.int32), element_strides(q), k, element_strides(k), v, element_strides(v),
                      keys, np.array(keys.shape, np.int32), values, at]
        arrays += [part_acc, part_max, part_sum]
        build_chunk(tmp_path, d, q_heads, kv_heads, scale, rope).run(ctypes.c_int(kv_heads * query_tiles * splits),
                                                                     *[ptr(a.ctypes.data) for a in arrays])
        part_max_shape = np.array(part_max.shape, np.int32)
        merge.run(ctypes.c_int(rows), *[ptr(a.ctypes.data) for a in (part_acc, part_max, part_max_shape, part_sum,
                                                                      out)])
        return out, keys, values

    q_out = np.zeros((1, q_heads, tokens, d), np.uint16)
    k_out = np.zeros((1, kv_heads, tokens, d), np.uint16)
    v_out = np.zeros((1, kv_heads, tokens, d), np.uint16)
    arrays = [qkv, np.array(qkv.shape, np.int32), q_weight, k_weight, frequencies, at, np.array([1], np.int32), q_out,
              k_out, v_out]  # held by the list while the kernel runs
    qk_constants = constants_of(d, q_heads, kv_heads, 1.0) + rope_constants(traditional)
    build_qk_rope(tmp_path / f"qk-{int(norm)}{int(traditional)}", qk_constants, norm).run(
        ctypes.c_int(-(-(tokens * heads) // 4)), *[ptr(a.ctypes.data) for a in arrays])
    two_kernels, keys_two, values_two = attend(q_out, k_out, None)
    roped, keys_roped, values_roped = attend(None, None, (norm, traditional))
    np.testing.assert_array_equal(keys_roped[0, :, offset:length], k_out[0])
    np.testing.assert_array_equal(keys_roped, keys_two)
    np.testing.assert_array_equal(values_roped, values_two)
    np.testing.assert_array_equal(roped, two_kernels)
    assert not np.array_equal(k_out, k_raw)  # the rotation did something
    assert np.abs(from_bf16_bits(roped)).max() > 0.05  # a real signal
