"""Decode-sized 4/8-bit products on CUDA: MLX's quantized_matmul against our kernel (csrc/nn/cuda_matvec.cpp).

    python -m benchmarks.gpu.matvec_bench --out FILE.json

For each weight of a Qwen3-4B- and a Llama-3-8B-shaped decode step (q|k|v, o, gate|up, down fused as our
decoder holds them, and the vocabulary head; affine 4-bit, group 64, bfloat16 scales and activations): 20
products of one row with that weight in one evaluation, best of 3 rounds, for MLX and for our kernel at
several (warps per block W, rows per block R, chunks a lane loads before it multiplies U); gate|up also at 4,
7 and 8 rows, and at 8 bits. The kernel's source is read from csrc/nn/cuda_matvec.cpp, so this times what the
runner runs, at any (W, R, U).

Prints, per weight: microseconds and GB/s (packed bytes: weights + scales + biases, over the time) and the
error (max |Δ| / max |x W^T| against the float product of the dequantized weight). Then the time of one
decode step's products (each weight times its layer count) per side, and the (W, R, U) with the least time
over both shapes (each shape's time relative to its best variant, summed): the runner's kRowsPerBlock,
kWarpsPerBlock and kChunksPerPass. Writes FILE.json with every figure.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]
# (warps per block W, rows per block R, chunks a lane loads before it multiplies U)
VARIANTS = [(1, 4, 1), (2, 2, 1), (4, 1, 1), (4, 2, 1), (8, 1, 1), (4, 4, 1), (8, 2, 1),
            (1, 4, 2), (1, 4, 4), (2, 2, 2), (2, 2, 4), (4, 1, 4), (1, 2, 4), (4, 2, 2)]
# (rows N, columns K, times per decode step)
SHAPES = {"qwen3-4b": [(6144, 2560, 36), (2560, 4096, 36), (19456, 2560, 36), (2560, 9728, 36), (151936, 2560, 1)],
          "llama3-8b": [(6144, 4096, 32), (4096, 4096, 32), (28672, 4096, 32), (4096, 14336, 32), (128256, 4096, 1)]}
GATE_UP = {19456, 28672}
GROUP = 64


def our_kernel():
    source = re.findall(r'R"\((.*?)\)";', (ROOT / "csrc" / "nn" / "cuda_matvec.cpp").read_text(), re.S)[0]
    kernel = mx.fast.cuda_kernel("mlxr_qmv_bench", ["x", "w", "scales", "biases"], ["out"], source)

    def run(x, packed, scales, biases, bits, warps, rows_per_block, chunks_per_pass):
        rows, n = x.shape[0], packed.shape[0]
        blocks = (n + rows_per_block - 1) // rows_per_block
        return kernel(inputs=[x, packed, scales, biases],
                      template=[("T", x.dtype), ("BITS", bits), ("GROUP", GROUP), ("M", rows), ("R", rows_per_block),
                                ("W", warps), ("U", chunks_per_pass)],
                      grid=(blocks * 32 * warps, 1, 1), threadgroup=(32 * warps, 1, 1), output_shapes=[(rows, n)],
                      output_dtypes=[x.dtype])[0]
    return run


def best_seconds(fn, inputs: list[mx.array], rounds: int = 3) -> float:
    mx.eval([fn(x) for x in inputs[:2]])
    mx.synchronize()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        mx.eval([fn(x) for x in inputs])
        mx.synchronize()
        best = min(best, (time.perf_counter() - started) / len(inputs))
    return best


def measure(ours, n: int, k: int, bits: int, rows: int, variants: list[tuple[int, int, int]]) -> dict:
    weight = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    packed, scales, biases = mx.quantize(weight, group_size=GROUP, bits=bits)
    exact = mx.dequantize(packed, scales, biases, group_size=GROUP, bits=bits).astype(mx.float32)
    mx.eval(packed, scales, biases, exact)
    nbytes = packed.nbytes + scales.nbytes + biases.nbytes
    inputs = [mx.random.normal((rows, k)).astype(mx.bfloat16) for _ in range(20)]
    mx.eval(inputs)
    want = inputs[0].astype(mx.float32) @ exact.T
    scale = mx.abs(want).max().item()

    def figures(fn) -> dict:
        seconds = best_seconds(fn, inputs)
        error = mx.abs(fn(inputs[0]).astype(mx.float32) - want).max().item() / scale
        return {"us": seconds * 1e6, "gb_s": nbytes / seconds / 1e9, "error": error}

    out = {"mlx": figures(lambda x: mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=GROUP,
                                                        bits=bits))}
    for warps, rows_per_block, chunks in variants:
        out[f"W{warps}R{rows_per_block}U{chunks}"] = figures(
            lambda x, w=warps, r=rows_per_block, u=chunks: ours(x, packed, scales, biases, bits, w, r, u))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    ours = our_kernel()
    report: dict = {"products": [], "step_us": {}}
    for model, shapes in SHAPES.items():
        step = {"mlx": 0.0, **{f"W{w}R{r}U{u}": 0.0 for w, r, u in VARIANTS}}
        for n, k, count in shapes:
            for rows in [1, 4, 7, 8] if n in GATE_UP else [1]:
                figures = measure(ours, n, k, 4, rows, VARIANTS)
                report["products"].append({"model": model, "n": n, "k": k, "bits": 4, "rows": rows, **figures})
                print(f"{model} {n}x{k} q4 rows={rows}: " + " | ".join(
                    f"{side} {f['us']:.1f} us {f['gb_s']:.0f} GB/s ({f['error']:.0e})" for side, f in figures.items()),
                      flush=True)
                if rows == 1:
                    for side, f in figures.items():
                        step[side] += count * f["us"]
            mx.clear_cache()
        report["step_us"][model] = step
        print(f"{model}: one decode step's products (us): " + ", ".join(f"{s} {t:.0f}" for s, t in step.items()))
    ours_names = [f"W{w}R{r}U{u}" for w, r, u in VARIANTS]
    score = {name: sum(report["step_us"][m][name] / min(report["step_us"][m][o] for o in ours_names)
                       for m in SHAPES) for name in ours_names}
    report["best"] = min(score, key=score.get)
    print("least time over both shapes:", report["best"], {name: round(v, 3) for name, v in score.items()})
    best = tuple(int(v) for v in re.findall(r"\d+", report["best"]))
    for model, shapes in SHAPES.items():
        n, k, _ = next(shape for shape in shapes if shape[0] in GATE_UP)
        figures = measure(ours, n, k, 8, 1, [best])
        report["products"].append({"model": model, "n": n, "k": k, "bits": 8, "rows": 1, **figures})
        sides = " | ".join(f"{side} {f['gb_s']:.0f} GB/s" for side, f in figures.items())
        print(f"{model} {n}x{k} q8 rows=1: {sides}")
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
