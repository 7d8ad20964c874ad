"""A chunk's attention over the cache, kernel by kernel: our tensor-core chunk kernel (`_core.cuda_chunk_attention`,
csrc/nn/cuda_decode_attention.h) against MLX's path (cuDNN's attention over the cache's first `length` slots, as the
decoder runs it with the kernel off), on the Qwen3-4B's heads (32 query heads, 8 key heads, 128 wide, bf16).

The prompt cache's follow-up (64 tokens after 3,000 cached) spent ~1.5 ms of its ~7.5 ms in this attention on an
H100 (benchmarks/README.md, "Session 25"; ~1.1 ms after session 26). This script times the kernels alone
(torch.profiler's CUPTI kernel times, N calls, one evaluation each, per call) for a few chunk lengths and contexts,
and sweeps how many blocks the chunk kernel's splits aim at (MLXRUNNER_CHUNK_BLOCKS, read once per process: a child
process per setting). benchmarks/gpu/chunk_kernel_probe.py times variants of the kernel's source and its phases.

    python -m benchmarks.gpu.chunk_attention_bench --out OUT [--blocks 132,264,384,768] [--calls 20]

Writes OUT/chunk_attention.json and prints a markdown table (µs a call: the parts kernel, the merge, all kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [(64, 3000), (16, 3000), (128, 3000), (64, 1000), (64, 8000)]  # (chunk tokens, cached positions)
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DEFAULT_BLOCKS = "132,264,384,528,768,1056"


def capacity_for(length: int) -> int:
    return (length + 255) // 256 * 256  # the cache's buffers grow in steps of 256 positions


def inputs(mx, tokens: int, offset: int):
    """q [1, Q, T, D] (a heads-first view of a tokens-first array, as the decoder's), k and v [1, KV, T, D] (v a
    strided view of a q|k|v-like projection), and the cache's buffers of capacity_for(offset + T) positions."""
    key = mx.random.key(tokens * 100_003 + offset)
    kq, kk, kv, kc, kw = mx.random.split(key, 5)
    capacity = capacity_for(offset + tokens)
    q = mx.random.normal((1, tokens, Q_HEADS, HEAD_DIM), key=kq).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    k = mx.random.normal((1, KV_HEADS, tokens, HEAD_DIM), key=kk).astype(mx.bfloat16)
    projection = mx.random.normal((1, tokens, 3 * KV_HEADS, HEAD_DIM), key=kv).astype(mx.bfloat16)
    v = projection[:, :, KV_HEADS: 2 * KV_HEADS].transpose(0, 2, 1, 3)
    keys = mx.random.normal((1, KV_HEADS, capacity, HEAD_DIM), key=kc).astype(mx.bfloat16)
    values = mx.random.normal((1, KV_HEADS, capacity, HEAD_DIM), key=kw).astype(mx.bfloat16)
    mx.eval(q, k, v, keys, values)
    return q, k, v, keys, values


def per_call_us(summary: dict, calls: int, needle: str | None = None) -> float:
    """µs a call of the kernels whose name holds `needle` (all of them if None)."""
    total_ms = summary["kernel_sum_ms"] if needle is None else sum(
        t["total_ms"] for t in summary["top"] if needle in t["name"])
    return total_ms * 1000 / calls


def time_case(mx, _core, profiler, side: str, tokens: int, offset: int, calls: int) -> dict:
    """One shape on one side: `calls` calls, each evaluated on its own, profiled; µs a call."""
    q, k, v, keys, values = inputs(mx, tokens, offset)
    length, scale = offset + tokens, HEAD_DIM ** -0.5
    # made by the device, as the decoder's (Decoder::device_offset): host-made arrays are slow for kernels to read
    position = mx.arange(offset, offset + 1, dtype=mx.int32)

    def one():
        if side == "ours":
            return _core.cuda_chunk_attention(q, k, v, keys, values, position, length, scale)
        return mx.fast.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length], scale=scale,
                                                    mask="causal")

    def many():
        # One evaluation a call: calls in one evaluation are independent nodes of MLX's CUDA graph, which may run
        # together, each kernel's time then including the others'.
        for _ in range(calls):
            mx.eval(one())
        mx.synchronize()

    many()  # compiles and warms
    summary = profiler.run(f"{side}-{tokens}-{offset}", many, per=calls)
    row = {"tokens": tokens, "offset": offset, "all_us": per_call_us(summary, calls),
           "kernels_a_call": summary["kernels"] / calls, "top": summary["top"][:4]}
    if side == "ours":
        row["parts_us"] = per_call_us(summary, calls, "chunk_attention_parts")
        row["merge_us"] = per_call_us(summary, calls, "decode_attention_merge")
    return row


def child(side: str, calls: int) -> dict:
    """One process: every case on one side ("ours" under this process's MLXRUNNER_CHUNK_BLOCKS, or "mlx")."""
    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)
    import mlx.core as mx

    from benchmarks.gpu.profile import KernelProfiler
    from mlxrunner import _core

    blocks = os.environ.get("MLXRUNNER_CHUNK_BLOCKS")
    if not mx.cuda.is_available():
        return {"side": side, "blocks": blocks, "error": "not on CUDA: the chunk kernel runs on CUDA only"}
    with tempfile.TemporaryDirectory(prefix="chunk-bench-") as tmp:
        profiler = KernelProfiler(Path(tmp))
        rows = [time_case(mx, _core, profiler, side, tokens, offset, calls) for tokens, offset in CASES]
    return {"side": side, "blocks": blocks, "rows": rows}


def run_child(side: str, calls: int, blocks: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MLXRUNNER_CHUNK_BLOCKS", None)
    if blocks is not None:
        env["MLXRUNNER_CHUNK_BLOCKS"] = blocks
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.chunk_attention_bench", "--child", side,
                           "--calls", str(calls)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"side": side, "blocks": blocks, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: list[dict]) -> str:
    lines = ["| side | blocks aimed at | " + " | ".join(f"{t} tokens after {o}" for t, o in CASES) + " |",
             "|---|---|" + "---:|" * len(CASES)]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['side']} | {result.get('blocks') or 'default'} | error: "
                         f"{result['error'].strip().splitlines()[-1] if result['error'].strip() else '?'} |")
            continue
        cells = []
        for row in result["rows"]:
            if result["side"] == "ours":
                cells.append(f"{row['parts_us']:.1f} + {row['merge_us']:.1f} = {row['all_us']:.1f}")
            else:
                cells.append(f"{row['all_us']:.1f} ({row['kernels_a_call']:.0f} kernels)")
        name = "ours: parts + merge = all µs" if result["side"] == "ours" else "MLX (cuDNN): all µs"
        lines.append(f"| {name} | {result.get('blocks') or 'default (384)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--blocks", default=DEFAULT_BLOCKS, help="comma-separated MLXRUNNER_CHUNK_BLOCKS settings")
    parser.add_argument("--calls", type=int, default=20, help="calls per case, in one evaluation")
    parser.add_argument("--child", choices=["ours", "mlx"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.calls)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    results = [run_child("mlx", args.calls, None)]
    results += [run_child("ours", args.calls, blocks) for blocks in args.blocks.split(",") if blocks]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chunk_attention.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
