"""A short chunk's products on one GPU: our kernel (`_core.rows_product`, MLXRUNNER_ROWS_PRODUCT) against MLX's
cuBLAS product, at the Qwen3-4B's and the Llama-3-8B's four weights a layer, kernel by kernel.

    python -m benchmarks.gpu.rows_product_bench --out OUT [--rows 64,16] [--blocks 132,264,528] [--calls 20]

Each side runs in a child process (ours once per MLXRUNNER_ROWS_PRODUCT_BLOCKS setting: how many blocks its K splits
aim at). Per shape: a ring of weights larger than the 50 MB L2 (so each call reads its weight from memory, as a
forward does), `--calls` calls each evaluated on its own (calls in one evaluation are independent nodes of MLX's CUDA
graph and may overlap), CUPTI's kernel time per call (torch.profiler) and the weight's bytes over it; ours is checked
against the product first. Writes OUT/rows_product.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu.side_children import run_sides

SHAPES = [  # (model, weight, N, K)
    ("qwen3-4b", "q|k|v", 6144, 2560), ("qwen3-4b", "o", 2560, 4096), ("qwen3-4b", "gate|up", 19456, 2560),
    ("qwen3-4b", "down", 2560, 9728), ("llama3-8b", "q|k|v", 6144, 4096), ("llama3-8b", "o", 4096, 4096),
    ("llama3-8b", "gate|up", 28672, 4096), ("llama3-8b", "down", 4096, 14336),
]
RING_BYTES = 160e6  # > the H100's and H200's 50 MB L2, three times over


def time_shape(mx, _core, profiler, side: str, rows: int, n: int, k: int, calls: int) -> dict:
    from benchmarks.gpu.chunk_attention_bench import per_call_us

    ring = max(1, int(-(-RING_BYTES // (n * k * 2))))
    weights = [(mx.random.normal((n, k), key=mx.random.key(i)) * 0.02).astype(mx.bfloat16) for i in range(ring)]
    x = mx.random.normal((rows, k), key=mx.random.key(rows)).astype(mx.bfloat16)
    mx.eval(weights, x)
    row = {"rows": rows, "n": n, "k": k, "ring": ring}
    if side == "ours":
        got, want = _core.rows_product(x, weights[0]), x @ weights[0].T
        if got is None:
            return {**row, "error": "the kernel declined the shape"}
        gap = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max() / mx.abs(want.astype(mx.float32)).max()
        row["relative_gap"] = gap.item()
        row["splits"] = _core.rows_product_splits(n, k)

    def one(i: int):
        return _core.rows_product(x, weights[i % ring]) if side == "ours" else x @ weights[i % ring].T

    def many():
        for i in range(calls):
            mx.eval(one(i))
        mx.synchronize()

    many()  # compiles and warms
    summary = profiler.run(f"{side}-{rows}-{n}-{k}", many, per=calls)
    row["us"] = per_call_us(summary, calls)
    row["tb_s"] = n * k * 2 / (row["us"] * 1e-6) / 1e12
    row["kernels_a_call"] = summary["kernels"] / calls
    return row


def child(side: str, rows_list: list[int], calls: int) -> dict:
    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)
    import mlx.core as mx

    from benchmarks.gpu.profile import KernelProfiler
    from mlxrunner import _core

    blocks = os.environ.get("MLXRUNNER_ROWS_PRODUCT_BLOCKS")
    if not mx.cuda.is_available():
        return {"side": side, "blocks": blocks, "error": "not on CUDA (the kernel runs on CUDA only)"}
    with tempfile.TemporaryDirectory(prefix="rows-product-") as tmp:
        profiler = KernelProfiler(Path(tmp))
        rows = [dict(time_shape(mx, _core, profiler, side, r, n, k, calls), model=model, weight=weight)
                for r in rows_list for model, weight, n, k in SHAPES]
    return {"side": side, "blocks": blocks, "rows": rows}


def markdown(results: list[dict]) -> str:
    lines = ["| side | blocks aimed at | rows | model | weight | µs a call | TB/s | splits | gap |",
             "|---|---|---:|---|---|---:|---:|---:|---:|"]
    for result in results:
        name = "ours" if result["side"] == "ours" else "MLX (cuBLAS)"
        blocks = result.get("blocks") or ("default (264)" if result["side"] == "ours" else "")
        if "error" in result:
            lines.append(f"| {name} | {blocks} | error: {result['error'].strip().splitlines()[-1]} |")
            continue
        for row in result["rows"]:
            if "error" in row:
                lines.append(f"| {name} | {blocks} | {row['rows']} | {row['model']} | {row['weight']} | "
                             f"{row['error']} |")
                continue
            lines.append(f"| {name} | {blocks} | {row['rows']} | {row['model']} | {row['weight']} | {row['us']:.1f} | "
                         f"{row['tb_s']:.2f} | {row.get('splits', '')} | {row.get('relative_gap', 0):.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rows", default="64,16", help="comma-separated rows of x")
    parser.add_argument("--blocks", default="132,264,528", help="comma-separated MLXRUNNER_ROWS_PRODUCT_BLOCKS")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--child", choices=["ours", "mlx"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, [int(r) for r in args.rows.split(",") if r], args.calls)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    return run_sides("benchmarks.gpu.rows_product_bench", ["--rows", args.rows, "--calls", str(args.calls)],
                     "MLXRUNNER_ROWS_PRODUCT_BLOCKS", args.blocks, args.out, "rows_product", markdown)


if __name__ == "__main__":
    sys.exit(main())
