"""Where the chunk kernel's time goes, and what a variant of it would take, without rebuilding `_core`.

The chunk kernel (csrc/nn/cuda_decode_attention.cpp, `kChunkAttentionParts`) is a CUDA source string that MLX
compiles at its first use. This script reads that string from the source tree, optionally patches it (a variant),
and runs it through `mx.fast.cuda_kernel` from Python on the Qwen3-4B's heads (32 query heads, 8 key heads, 128
wide, bf16), so that one device call can time several variants and split settings:

- times: CUPTI's kernel time per call (torch.profiler), each call evaluated on its own (calls in one evaluation are
  independent nodes of MLX's CUDA graph and may overlap, which inflates each one's duration);
- phases: with `--phases`, thread 0 of every block stamps `clock64()` at the kernel's start, after the chunk's slot
  writes, after the queries load, after the key loop and at the end, and `%globaltimer` at the start and the end:
  the median block's cycles in each phase and the spread of the blocks' start times;
- correctness: every variant's merged output against MLX's attention (cuDNN) over the same keys.

    python -m benchmarks.gpu.chunk_kernel_probe --out OUT [--variants base,...] [--splits 8,12,16] [--phases]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import struct
import tempfile
from pathlib import Path

# the same shapes and inputs as chunk_attention_bench (Qwen3-4B's heads)
from benchmarks.gpu.chunk_attention_bench import HEAD_DIM, KV_HEADS, Q_HEADS, inputs

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "nn"
CASES = [(64, 3000), (16, 3000), (64, 8000)]


def source_constants() -> dict[str, str]:
    found = {}
    for name in ("cuda_kernel_common.h", "cuda_decode_attention.cpp"):
        text = (CSRC / name).read_text()
        found.update(re.findall(r'constexpr const char\* (\w+) = R"\((.*?)\)";', text, re.S))
    return found


def replaced(text: str, old: str, new: str) -> str:
    """`old`, which must occur exactly once (a source that changed under a patch fails loudly), replaced by `new`."""
    if text.count(old) != 1:
        raise ValueError(f"not found once in the kernel's source: {old!r}")
    return text.replace(old, new)


def patched(text: str, anchor: str, insert: str) -> str:
    """`insert` put before `anchor`."""
    return replaced(text, anchor, insert + anchor)


STAMP = "if (threadIdx.x == 0) stamp_cycles[{slot}] = clock64();\n"
GLOBAL_TIME = "{{ unsigned long long t; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t)); " \
              "if (threadIdx.x == 0) stamp_times[{slot}] = t; }}\n"


PHASES = ["start .. offset read", "slot writes", "first stage issued", "queries loaded", "first stage waited",
          "key loop", "stores"]


def with_phases(body: str) -> str:
    """The kernel with per-block stamps (output stamps [blocks, 10] int64: cycles at 8 points, 2 global times).
    A stamp records when thread 0 issued it: a load's wait lands in the phase that first uses the value."""
    prologue = ("  long long* stamp_cycles = reinterpret_cast<long long*>(stamps) + blockIdx.x * 10;\n"
                "  unsigned long long* stamp_times =\n"
                "      reinterpret_cast<unsigned long long*>(stamps) + blockIdx.x * 10 + 8;\n"
                "  " + STAMP.format(slot=0) + "  " + GLOBAL_TIME.format(slot=0))
    body = prologue + body
    body = patched(body, "  const float scale = ", "  " + STAMP.format(slot=1))
    body = patched(body, "  // Two stages of kKeys keys", "  " + STAMP.format(slot=2))
    body = patched(body, "  const int row_lo = ", "  " + STAMP.format(slot=3))
    body = patched(body, "  for (int tile = begin, stage = 0;", "  " + STAMP.format(slot=4))
    body = patched(body, "    float score[kKeys / 8][4];", "    if (tile == begin) " + STAMP.format(slot=5))
    body = patched(body, "  const float ln2 = 0.6931471805599453f;", "  " + STAMP.format(slot=6))
    return body + "  __syncthreads();\n  " + STAMP.format(slot=7) + "  " + GLOBAL_TIME.format(slot=1)


def restaged(keys: int, stages: int, warps: int):
    """The kernel with `keys` keys a stage, `stages` stages in flight (dynamic shared memory, past the 48 KB of
    static shared memory) and `warps` warps of 16 query rows a block."""

    def patch(body: str) -> str:
        body = replaced(body, "  constexpr int kWarps = 4;\n", f"  constexpr int kWarps = {warps};\n")
        body = replaced(body, "  constexpr int kKeys = 32;       // keys a stage\n",
                        f"  constexpr int kKeys = {keys};\n  constexpr int kStages = {stages};\n")
        body = replaced(
            body,
            "  __shared__ __align__(16) T key_tile[2][kKeys][D + kPad];\n"
            "  __shared__ __align__(16) T value_tile[2][kKeys][D + kPad];\n",
            "  extern __shared__ __align__(16) unsigned char dynamic_shared[];\n"
            "  auto key_tile = reinterpret_cast<T (*)[kKeys][D + kPad]>(dynamic_shared);\n"
            "  auto value_tile = reinterpret_cast<T (*)[kKeys][D + kPad]>(dynamic_shared + "
            "kStages * kKeys * (D + kPad) * sizeof(T));\n")
        body = replaced(
            body,
            "  if (begin < end) load_stage(0, begin);  // in flight while the queries load\n",
            "  for (int s = 0; s < kStages - 1; ++s) {\n"
            "    if (begin + s * kKeys < end) load_stage(s, begin + s * kKeys); else commit_async_copies();\n"
            "  }\n")
        head = body[body.index("  for (int tile = begin, stage = 0;"):body.index("    float score[kKeys / 8][4];")]
        body = replaced(
            body, head,
            "  for (int tile = begin, stage = 0; tile < end; tile += kKeys, stage = (stage + 1) % kStages) {\n"
            "    const int ahead = tile + (kStages - 1) * kKeys;\n"
            "    if (ahead < end) load_stage((stage + kStages - 1) % kStages, ahead); else commit_async_copies();\n"
            "    wait_async_copies<kStages - 1>();\n"
            "    __syncthreads();\n")
        return body

    return patch, 2 * stages * keys * (HEAD_DIM + 8) * 2, warps


# name -> (patch of the kernel body, dynamic shared memory bytes, warps a block). "base": the source as committed.
VARIANTS = {
    "base": (lambda body: body, 0, 4),
    "k32s3": restaged(32, 3, 4),
    "k32s4": restaged(32, 4, 4),
    "k64s2": restaged(64, 2, 4),
    "k64s3": restaged(64, 3, 4),
    "w8k32s3": restaged(32, 3, 8),
    "w8k64s2": restaged(64, 2, 8),
}


def merged(mx, acc, top, total):
    """The splits' parts (acc [rows, S, D], top and total [rows, S]; natural-log units) -> [rows, D] float."""
    best = mx.max(top, axis=1, keepdims=True)
    weight = mx.exp(top - best)
    return mx.sum(acc * weight[..., None], axis=1) / mx.sum(total * weight, axis=1)[:, None]


class Runner:
    def __init__(self, mx, consts: dict[str, str], phases: bool):
        self.mx, self.consts, self.phases, self.kernels = mx, consts, phases, {}

    def kernel(self, variant: str):
        if variant not in self.kernels:
            patch, smem, _ = VARIANTS[variant]
            body = patch(self.consts["kChunkAttentionParts"])
            outputs = ["part_acc", "part_max", "part_sum"]
            if self.phases:
                body = with_phases(body)
                outputs.append("stamps")
            header = self.consts["kCudaMma"] + self.consts["kCudaAsyncCopies"] + self.consts["kChunkAttentionHelpers"]
            name = f"probe_{variant}" + ("_phases" if self.phases else "")
            self.kernels[variant] = (self.mx.fast.cuda_kernel(name, ["q", "k", "v", "keys", "values", "position"],
                                                              outputs, body, header, False, smem), smem)
        return self.kernels[variant]

    def call(self, variant: str, tensors, offset: int, splits: int):
        mx = self.mx
        q, k, v, keys, values = tensors
        tokens = q.shape[2]
        rows = tokens * Q_HEADS
        warps = VARIANTS[variant][2]
        rows_a_block, threads = 16 * warps, 32 * warps
        query_tiles = (Q_HEADS // KV_HEADS * tokens + rows_a_block - 1) // rows_a_block
        blocks = KV_HEADS * query_tiles * splits
        kernel, _ = self.kernel(variant)
        shapes = [(rows, splits, HEAD_DIM), (rows, splits), (rows, splits)]
        dtypes = [mx.float32] * 3
        if self.phases:
            shapes.append((blocks, 10))
            dtypes.append(mx.int64)
        scale_bits = struct.unpack("<i", struct.pack("<f", HEAD_DIM ** -0.5))[0]
        template = [("T", mx.bfloat16), ("D", HEAD_DIM), ("Q_HEADS", Q_HEADS), ("KV_HEADS", KV_HEADS),
                    ("SCALE_BITS", scale_bits)]
        # made by the device, as the decoder's (Decoder::device_offset): an array the host wrote is slow to read
        position = mx.arange(offset, offset + 1, dtype=mx.int32)
        return kernel(inputs=[q, k, v, keys, values, position], template=template, grid=(blocks * threads, 1, 1),
                      threadgroup=(threads, 1, 1), output_shapes=shapes, output_dtypes=dtypes)


def splits_for(length: int, splits: int) -> int:
    """The kernel rounds a split's keys up to a multiple of 64: the number of splits that leaves."""
    chunk = ((length + splits - 1) // splits + 63) // 64 * 64
    return (length + chunk - 1) // chunk


def reference(mx, tensors, offset: int):
    q, k, v, keys, values = tensors
    tokens = q.shape[2]
    length = offset + tokens
    full_k = mx.concatenate([keys[:, :, :offset], k], axis=2)
    full_v = mx.concatenate([values[:, :, :offset], v], axis=2)
    out = mx.fast.scaled_dot_product_attention(q, full_k, full_v, scale=HEAD_DIM ** -0.5, mask="causal")
    assert out.shape[2] == tokens and full_k.shape[2] == length
    return out.transpose(0, 2, 1, 3).reshape(tokens * Q_HEADS, HEAD_DIM).astype(mx.float32)


def probe_case(mx, runner: Runner, profiler, variant: str, tokens: int, offset: int, splits: int, calls: int) -> dict:
    tensors = inputs(mx, tokens, offset)
    length = offset + tokens
    splits = splits_for(length, splits)
    out = runner.call(variant, tensors, offset, splits)
    mx.eval(out)
    got = merged(mx, out[0], out[1], out[2])
    want = reference(mx, tensors, offset)
    error = mx.max(mx.abs(got - want)).item() / max(mx.max(mx.abs(want)).item(), 1e-30)
    row = {"variant": variant, "tokens": tokens, "offset": offset, "splits": splits, "relative_error": error}

    def many():
        for _ in range(calls):
            mx.eval(runner.call(variant, tensors, offset, splits))
        mx.synchronize()

    summary = profiler.run(f"{variant}-{tokens}-{offset}-{splits}", many, per=calls)
    needle = f"probe_{variant}"
    row["us"] = sum(t["total_ms"] for t in summary["top"] if needle in t["name"]) * 1000 / calls
    if runner.phases:
        import numpy as np

        stamps = np.array(out[3]).astype(np.int64)
        cycles = np.diff(stamps[:, :8], axis=1)  # PHASES, a row per block
        row["phase_cycles_median"] = dict(zip(PHASES, (int(statistics.median(c)) for c in cycles.T)))
        row["phase_cycles_max"] = dict(zip(PHASES, (int(c.max()) for c in cycles.T)))
        starts = stamps[:, 8].astype(np.float64)
        ends = stamps[:, 9].astype(np.float64)
        row["block_start_spread_us"] = float((starts.max() - starts.min()) / 1000)
        row["block_span_us_median"] = float(np.median(ends - starts) / 1000)
        row["kernel_span_us"] = float((ends.max() - starts.min()) / 1000)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--splits", default="8,12", help="splits to aim at for each (head, query tile)")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--phases", action="store_true")
    args = parser.parse_args(argv)

    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)
    import mlx.core as mx

    from benchmarks.gpu.profile import KernelProfiler

    runner = Runner(mx, source_constants(), args.phases)
    rows = []
    with tempfile.TemporaryDirectory(prefix="chunk-probe-") as tmp:
        profiler = KernelProfiler(Path(tmp))
        for variant in filter(None, args.variants.split(",")):
            for tokens, offset in CASES:
                for splits in (int(s) for s in args.splits.split(",")):
                    try:
                        row = probe_case(mx, runner, profiler, variant, tokens, offset, splits, args.calls)
                    except Exception as exc:  # a variant that fails to compile or run is a finding, not the end
                        row = {"variant": variant, "tokens": tokens, "offset": offset, "error": str(exc)[-1500:]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chunk_probe.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
