"""A forward's four products a layer for a short chunk, chained as a forward runs them: x W^T (as the decoder
multiplies) against W x^T (the chunk's rows as the product's columns), MLX's cuBLAS path both.

    python -m benchmarks.gpu.product_chain --out FILE.json [--rows 64] [--layers 36] [--distinct 6] [--runs 7]

Why chained: a bench of independent products (session 35's) lets MLX's CUDA graph run them side by side, which hides
a product that fills the GPU poorly on its own; in a forward each product waits for the one before. Here each
product's input is the last one's output (times a small scale, one cheap operation as a forward's norms are), over
`--distinct` layers' weights of the Qwen3-4B shape (past the L2) repeated to `--layers` layers, the output shapes
made to chain: q|k|v [6144, 2560], o [2560, 6144], gate|up [19456, 2560], down [2560, 19456].

Per orientation, with each layer queued as it is built (as the decoder's prefill does) and without: the median and
best wall time of `--runs` chains (host and device; the device's share shows as the gap to the host's), then, where
torch's profiler sees MLX's kernels, each kernel's mean device time and the kernels' sum for one chain. The weights'
bytes over the products' device time is the rate to compare with the card's copy rate (2.9-3.0 TB/s on an H100).

Writes the JSON and prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SHAPES = [(6144, 2560), (2560, 6144), (19456, 2560), (2560, 19456)]  # [N, K]: chainable stand-ins of a 4B layer's


def chain(mx, weights, rows: int, layers: int, rows_first: bool, queued: bool) -> float:
    """One chain's wall seconds: x W^T throughout (rows_first) or W x^T."""
    shape = (rows, SHAPES[0][1]) if rows_first else (SHAPES[0][1], rows)
    h = (mx.random.normal(shape) * 0.1).astype(mx.bfloat16)
    mx.eval(h)
    mx.synchronize()
    started = time.perf_counter()
    for layer in range(layers):
        for w in weights[layer % len(weights)]:
            h = (mx.matmul(h, w.T) if rows_first else mx.matmul(w, h)) * 0.05
        if queued:
            mx.async_eval(h)
    mx.eval(h)
    mx.synchronize()
    return time.perf_counter() - started


def kernel_times(mx, weights, rows: int, layers: int, rows_first: bool) -> dict | None:
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        chain(mx, weights, rows, layers, rows_first, True)
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            by_name.setdefault(event.name[:100], []).append(event.device_time)
    if not by_name:
        return None
    total = sum(sum(v) for v in by_name.values())
    return {"kernel_sum_ms": total / 1e3,
            "kernels": [{"name": name, "count": len(v), "mean_us": sum(v) / len(v)}
                        for name, v in sorted(by_name.items(), key=lambda item: -sum(item[1]))[:10]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--distinct", type=int, default=6)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)

    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)
    import mlx.core as mx

    mx.random.seed(0)
    weights = [[(mx.random.normal(shape) * 0.02).astype(mx.bfloat16) for shape in SHAPES]
               for _ in range(args.distinct)]
    mx.eval(weights)
    weight_bytes = sum(n * k * 2 for n, k in SHAPES) * args.layers
    report: dict = {"settings": vars(args) | {"out": str(args.out)}, "weight_bytes_a_chain": weight_bytes,
                    "device": str(mx.default_device()), "sides": {}}
    for queued in (True, False):
        for rows_first in (True, False, True, False):  # each twice, in turn: the machine's drift on both
            name = f"{'x W^T' if rows_first else 'W x^T'}, {'queued a layer' if queued else 'queued at the end'}"
            for _ in range(2):
                chain(mx, weights, args.rows, args.layers, rows_first, queued)
            times = [chain(mx, weights, args.rows, args.layers, rows_first, queued) for _ in range(args.runs)]
            row = report["sides"].setdefault(name, {"median_ms": [], "best_ms": []})
            row["median_ms"].append(statistics.median(times) * 1e3)
            row["best_ms"].append(min(times) * 1e3)
            print(f"{name}: median {row['median_ms'][-1]:.3f} ms, best {row['best_ms'][-1]:.3f} ms "
                  f"({weight_bytes / min(times) / 1e12:.2f} TB/s at the best)", flush=True)
    for rows_first in (True, False):
        name = "x W^T" if rows_first else "W x^T"
        profiled = kernel_times(mx, weights, args.rows, args.layers, rows_first)
        report[f"kernels {name}"] = profiled
        if profiled:
            rate = weight_bytes / (profiled["kernel_sum_ms"] / 1e3) / 1e12
            print(f"{name}: kernels {profiled['kernel_sum_ms']:.3f} ms a chain ({rate:.2f} TB/s)")
            for kernel in profiled["kernels"][:6]:
                print(f"    {kernel['count']:4d} x {kernel['mean_us']:8.2f} us  {kernel['name']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
