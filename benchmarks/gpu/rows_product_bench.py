"""A short chunk's products on CUDA: MLX's (cuBLAS) against our kernel (csrc/nn/cuda_rows_product.cpp).

    python -m benchmarks.gpu.rows_product_bench --out FILE.json [--rows 16,64] [--rounds 5]

For each weight of a Qwen3-4B- and a Llama-3-8B-shaped layer (q|k|v, o, gate|up, down fused as our decoder holds
them, and the vocabulary head; bfloat16) and each row count: 20 products in one evaluation, rotating through copies
of the weight that together pass the GPU's L2 (so that each product reads its weight from memory, as a forward
does), best of `--rounds`, MLX's `x @ W.T` against `_core.cuda_rows_products` (which builds in C++ what a Linear
builds; MLX's side is built from Python, a few µs a product more). Both sides' times include the host's building and
encoding of the products, which is what the prompt cache's follow-up pays; gate|up is also timed gated (our kernel's
silu(gate) * up in its epilogue; MLX's side would add a kernel). Prints µs a product and GB/s (the weight's bytes over
the time), and writes every figure to FILE.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mlx.core as mx

from mlxrunner import _core

# (name, rows N, columns K) per shape
SHAPES = {"qwen3-4b": [("q|k|v", 6144, 2560), ("o", 2560, 4096), ("gate|up", 19456, 2560), ("down", 2560, 9728),
                       ("head", 151936, 2560)],
          "llama3-8b": [("q|k|v", 6144, 4096), ("o", 4096, 4096), ("gate|up", 28672, 4096), ("down", 4096, 14336),
                        ("head", 128256, 4096)]}
PRODUCTS = 20
RING_BYTES = 150e6  # three times an H100's 50 MB L2


def best_seconds(run, rounds: int) -> float:
    run()  # compiles, warms
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(n: int, k: int, rows: int, rounds: int, gate_up: bool) -> dict:
    copies = max(2, math.ceil(RING_BYTES / (n * k * 2)))
    ws = [(mx.random.normal((n, k), key=mx.random.key(i)) * k**-0.5).astype(mx.bfloat16) for i in range(copies)]
    x = mx.random.normal((1, rows, k), key=mx.random.key(99)).astype(mx.bfloat16)
    mx.eval(x, *ws)
    ring = [ws[i % copies] for i in range(PRODUCTS)]

    def mlx_side():
        mx.eval([x @ w.T for w in ring])

    def ours(gated: bool):
        return lambda: _core.cuda_rows_products([x] * PRODUCTS, ring, gated)

    if _core.cuda_rows_products([x], [ws[0]]) is None:
        return {"skipped": "the kernel does not take this product"}
    bytes_a_product = n * k * 2
    row = {}
    for name, run in [("mlx", mlx_side), ("ours", ours(False)), ("ours_gated", ours(True))]:
        if name == "ours_gated" and not gate_up:
            continue
        seconds = best_seconds(run, rounds) / PRODUCTS
        row[name] = {"us": seconds * 1e6, "tb_s": bytes_a_product / seconds / 1e12}
    del ws
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", default="16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=None, help="one shape of: " + ", ".join(SHAPES))
    args = parser.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    report: dict = {"device": str(mx.default_device()), "results": []}
    print("| shape | weight | rows | MLX µs (TB/s) | ours µs (TB/s) | ours gated µs | MLX / ours |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, weights in SHAPES.items():
        if args.only and shape != args.only:
            continue
        for name, n, k in weights:
            for rows in rows_list:
                row = measure(n, k, rows, args.rounds, gate_up=name == "gate|up")
                report["results"].append({"shape": shape, "weight": name, "n": n, "k": k, "rows": rows, **row})
                if "skipped" in row:
                    print(f"| {shape} | {name} | {rows} | {row['skipped']} | | | |")
                    continue
                gated = row.get("ours_gated", {}).get("us")
                print(f"| {shape} | {name} | {rows} | {row['mlx']['us']:.1f} ({row['mlx']['tb_s']:.2f}) | "
                      f"{row['ours']['us']:.1f} ({row['ours']['tb_s']:.2f}) | "
                      f"{'' if gated is None else f'{gated:.1f}'} | {row['mlx']['us'] / row['ours']['us']:.2f}× |",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
