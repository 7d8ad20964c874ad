"""Quantized products of many rows on CUDA: MLX's quantized_matmul against the dequantized weight times x.

    python -m benchmarks.gpu.qmm_bench --out FILE.json

For weights of the image DiTs and the 4B/8B LLM shapes (affine 4- and 8-bit, group 64, bfloat16), at 8 to 4,096
rows of x: 10 products in one evaluation, best of 3 rounds, for `mx.quantized_matmul` and for
`x @ mx.dequantize(W).T` (what csrc/nn/linear.cpp's `dequantized_matmul` runs). Prints a table of milliseconds a
product and the ratio per row count, and the smallest row count from which the dequantized product wins for every
weight: the runner's kCudaDequantizedRows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx

# (name, rows N, columns K)
WEIGHTS = [("zimage q 3840x3840", 3840, 3840), ("zimage w1 10240x3840", 10240, 3840),
           ("zimage w2 3840x10240", 3840, 10240), ("qwen3-4b gate|up 19456x2560", 19456, 2560),
           ("llama3-8b down 4096x14336", 4096, 14336)]
ROWS = [8, 16, 32, 64, 128, 256, 1024, 4096]
REPEATS = 10


def quantized_product(x, weight, bits):
    return mx.quantized_matmul(x, *weight, True, 64, bits)


def dequantized_product(x, weight, bits):
    return x @ mx.dequantize(*weight, 64, bits).T


def best_ms(product, *args) -> float:
    """Best of 3 rounds of REPEATS products evaluated together, per product."""
    mx.eval(product(*args))  # first use: kernels compiled here
    times = []
    for _ in range(3):
        started = time.perf_counter()
        mx.eval([product(*args) for _ in range(REPEATS)])
        mx.synchronize()
        times.append((time.perf_counter() - started) / REPEATS * 1e3)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = []
    for bits in (4, 8):
        for name, n, k in WEIGHTS:
            w = mx.random.normal((n, k), dtype=mx.bfloat16) * 0.02
            weight = mx.quantize(w, group_size=64, bits=bits)
            mx.eval(weight)
            for rows in ROWS:
                x = mx.random.normal((rows, k), dtype=mx.bfloat16)
                mx.eval(x)
                qmm = best_ms(quantized_product, x, weight, bits)
                deq = best_ms(dequantized_product, x, weight, bits)
                results.append({"bits": bits, "weight": name, "rows": rows, "qmm_ms": qmm, "dequantized_ms": deq})
                print(f"{bits}-bit {name:28s} rows {rows:5d}: qmm {qmm:8.3f} ms  dequantized {deq:8.3f} ms  "
                      f"qmm/dequantized {qmm / deq:5.2f}", flush=True)
    wins = [r for r in ROWS if all(x["qmm_ms"] >= x["dequantized_ms"] for x in results if x["rows"] >= r)]
    report = {"device": str(mx.default_device()), "results": results, "dequantized_wins_from_rows": min(wins or [None])}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("dequantized wins from rows:", report["dequantized_wins_from_rows"])


if __name__ == "__main__":
    main()
