"""Decode-sized 4/8-bit products on CUDA: MLX's quantized_matmul against our kernel (csrc/nn/cuda_matvec.cpp).

    python -m benchmarks.gpu.matvec_bench --out FILE.json [--half]

For each weight of a Qwen3-4B- and a Llama-3-8B-shaped decode step (q|k|v, o, gate|up, down fused as our
decoder holds them, and the vocabulary head; affine 4-bit, group 64, bfloat16 scales and activations): 20
products of one row with that weight in one evaluation, rotating through copies of the weight that together pass
the GPU's L2 (so that each product reads its weight from memory, as a decode step does), best of 3 rounds, for MLX
and for our tensor-core kernel ("ours": the (warps per 16-row tile W, segments per pass U) the runner launches for
that weight, then at every W in 2, 4, 8, 16 and U in 1, 2); gate|up also at 4, 7, 8 and 16 rows, and at 8 bits.
The kernel's source is read from csrc/nn/cuda_matvec.cpp, so this times what the runner runs.

Prints, per weight: microseconds and GB/s (packed bytes: weights + scales + biases, over the time) and the
error (max |Δ| / max |x W^T| against the float product of the dequantized weight). Then the time of one
decode step's products (each weight times its layer count) per side, and the variant with the least time over
both shapes (each shape's time relative to its best variant, summed). Writes FILE.json with every figure.

--half: the same weights in bfloat16, one row: MLX's product (its matrix-vector kernel) against ours, the tensor-core
kernel as the runner launches it under MLXRUNNER_HALF_MATVEC=1 ("ours": `_core.linear`; the script sets the switch
before the first product), the question being whether a bf16 decode step's products reach more of the bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "nn" / "cuda_matvec.cpp"
# (rows N, columns K, times per decode step)
SHAPES = {"qwen3-4b": [(6144, 2560, 36), (2560, 4096, 36), (19456, 2560, 36), (2560, 9728, 36), (151936, 2560, 1)],
          "llama3-8b": [(6144, 4096, 32), (4096, 4096, 32), (28672, 4096, 32), (4096, 14336, 32), (128256, 4096, 1)]}
GATE_UP = {19456, 28672}
GROUP = 64
TC_VARIANTS = [(w, u) for w in (2, 4, 8, 16) for u in (1, 2)]


def sources() -> dict[str, str]:
    return dict(re.findall(r'constexpr const char\* (\w+) = R"\((.*?)\)";', SOURCE.read_text(), re.S))


def constant(name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (\d+);", SOURCE.read_text()).group(1))


def tensor_core_kernel():
    """The plain product's kernel as the runner builds it (compacted, its variant's branches resolved)."""
    from mlxrunner import _core

    found = {name: _core.compact_kernel_source(text, {"MLXR_NORMED": False, "MLXR_HEADS": False})
             for name, text in sources().items()}
    kernel = mx.fast.cuda_kernel("mlxr_qmv_tc_bench", ["x", "w", "scales", "biases"], ["out"],
                                 found["kTensorCoreSource"], header=found["kTensorCoreHelpers"])

    def run(x, packed, scales, biases, bits, warps, passes):
        rows, n = x.shape[0], packed.shape[0]
        return kernel(inputs=[x, packed, scales, biases],
                      template=[("T", x.dtype), ("BITS", bits), ("GROUP", GROUP), ("XT", (rows + 7) // 8),
                                ("W", warps), ("U", passes), ("GATED", False)],
                      grid=((n + 15) // 16 * 32 * warps, 1, 1), threadgroup=(32 * warps, 1, 1),
                      output_shapes=[(rows, n)], output_dtypes=[x.dtype])[0]
    return run


def our_variants(bits: int, variants=TC_VARIANTS) -> dict:
    """name -> fn(x, packed, scales, biases): the kernel as the runner launches it, and at other (W, U)."""
    tc = tensor_core_kernel()
    passes = constant("kSegmentsPerPass")
    out = {"ours": lambda x, p, s, b: tc(x, p, s, b, bits, shipped_warps(p), passes)}
    for warps, u in variants:
        out[f"W{warps}U{u}"] = lambda x, p, s, b, w=warps, u=u: tc(x, p, s, b, bits, w, u)
    return out


def shipped_warps(packed: mx.array) -> int:
    """The warps a tile the runner launches for this (ungated) weight."""
    from mlxrunner import _core

    return _core.matvec_warps_per_tile(packed.shape[0], packed.shape[1])


def best_seconds(fn, inputs: list, rounds: int = 3) -> float:
    mx.eval([fn(x) for x in inputs[:2]])
    mx.synchronize()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        mx.eval([fn(x) for x in inputs])
        mx.synchronize()
        best = min(best, (time.perf_counter() - started) / len(inputs))
    return best


def figures(fn, inputs: list, want: mx.array, nbytes: int) -> dict:
    """One side's time for a product (best_seconds over fn(input) for each input), its bandwidth over the weight's
    `nbytes`, and its error against `want`, the float product of the first input (max |Δ| / max |want|)."""
    seconds = best_seconds(fn, inputs)
    error = mx.abs(fn(inputs[0]).astype(mx.float32) - want).max().item() / mx.abs(want).max().item()
    return {"us": seconds * 1e6, "gb_s": nbytes / seconds / 1e9, "error": error}


# Bytes of weight copies a timed product rotates through: well past an H100's or H200's 50 MB L2, so that each product
# reads its weight from memory, as a decode step does (each weight once a step). Timing one weight over and over let it
# come partly from L2 (session 22, H100: our bf16 kernel ran the 8B's 117 MB down projection at 3.55 TB/s, above the
# card's 2.94 TB/s copy rate; 2.6 TB/s rotated, 2.7 inside a real decode step).
ROTATION_BYTES = 512 << 20
PRODUCTS = 20  # products a round; product i multiplies input i with the weight's copy i % copies


def rotation(arrays: list[mx.array]) -> Callable[[int], list[mx.array]]:
    """Product i's copy of `arrays` (one weight's tensors): as many copies as fill ROTATION_BYTES (at least 1, at most
    PRODUCTS), the first `arrays` itself."""
    nbytes = sum(a.nbytes for a in arrays)
    count = max(1, min(PRODUCTS, -(-ROTATION_BYTES // nbytes)))
    held = [arrays] + [[a * 1 for a in arrays] for _ in range(count - 1)]
    mx.eval(held)
    return lambda i: held[i % count]


def measure(n: int, k: int, bits: int, rows: int, variants=TC_VARIANTS) -> dict:
    weight = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    packed, scales, biases = mx.quantize(weight, group_size=GROUP, bits=bits)
    exact = mx.dequantize(packed, scales, biases, group_size=GROUP, bits=bits).astype(mx.float32)
    mx.eval(packed, scales, biases, exact)
    nbytes = packed.nbytes + scales.nbytes + biases.nbytes
    weight_of = rotation([packed, scales, biases])
    xs = [mx.random.normal((rows, k)).astype(mx.bfloat16) for _ in range(PRODUCTS)]
    mx.eval(xs)
    inputs = list(range(PRODUCTS))
    want = xs[0].astype(mx.float32) @ exact.T
    out = {"mlx": figures(lambda i: mx.quantized_matmul(xs[i], *weight_of(i), transpose=True, group_size=GROUP,
                                                        bits=bits), inputs, want, nbytes)}
    for name, fn in our_variants(bits, variants).items():
        out[name] = figures(lambda i, fn=fn: fn(xs[i], *weight_of(i)), inputs, want, nbytes)
    return out


def show(model: str, n: int, k: int, bits: int, rows: int, figures: dict) -> None:
    print(f"{model} {n}x{k} q{bits} rows={rows}: " + " | ".join(
        f"{side} {f['us']:.1f} us {f['gb_s']:.0f} GB/s ({f['error']:.0e})" for side, f in figures.items()), flush=True)


def dispatch_costs(links: int = 400) -> dict:
    """Microseconds an operation of a chain of `links` dependent one-row products with a small (2,560²) weight
    costs, one evaluation, best of 3: where the GPU time is ~1 µs, the rest is what MLX spends per operation on
    the host (building, encoding, launching), per kind of operation."""
    n = 2560
    weight = (mx.random.normal((n, n)) * 0.02).astype(mx.bfloat16)
    packed, scales, biases = mx.quantize(weight, group_size=GROUP, bits=4)
    x = mx.random.normal((1, n)).astype(mx.bfloat16)
    mx.eval(weight, packed, scales, biases, x)
    ours = our_variants(4, [])["ours"]
    kinds = {"mlx quantized_matmul": lambda v: mx.quantized_matmul(v, packed, scales, biases, transpose=True,
                                                                   group_size=GROUP, bits=4),
             "ours (custom kernel)": lambda v: ours(v, packed, scales, biases),
             "bf16 matmul": lambda v: v @ weight.T,
             "add": lambda v: v + x}
    out = {}
    for name, step in kinds.items():
        best = float("inf")
        for _ in range(4):  # the first is a warm-up
            started = time.perf_counter()
            v = x
            for _ in range(links):
                v = step(v) * 0.5
            mx.eval(v)
            mx.synchronize()
            best = min(best, time.perf_counter() - started)
        out[name] = best / links * 1e6
    print("per operation of a chain (us, a product + a scale each): " +
          ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def measure_half(n: int, k: int) -> dict:
    from mlxrunner import _core

    weight = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    xs = [mx.random.normal((1, k)).astype(mx.bfloat16) for _ in range(PRODUCTS)]
    mx.eval(weight, xs)
    copy_of = rotation([weight])
    inputs = list(range(PRODUCTS))
    want = xs[0].astype(mx.float32) @ weight.astype(mx.float32).T
    sides = {"mlx": lambda i: xs[i] @ copy_of(i)[0].T, "ours": lambda i: _core.linear(xs[i], copy_of(i)[0])}
    return {name: figures(fn, inputs, want, weight.nbytes) for name, fn in sides.items()}


def main_half(out: Path) -> int:
    report: dict = {"products": [], "step_us": {}}
    for model, shapes in SHAPES.items():
        step: dict[str, float] = {}
        for n, k, count in shapes:
            figures = measure_half(n, k)
            report["products"].append({"model": model, "n": n, "k": k, "bits": 16, "rows": 1, **figures})
            show(model, n, k, 16, 1, figures)
            for side, f in figures.items():
                step[side] = step.get(side, 0.0) + count * f["us"]
            mx.clear_cache()
        report["step_us"][model] = step
        print(f"{model} bf16: one decode step's products (us): " + ", ".join(f"{s} {t:.0f}" for s, t in step.items()))
    out.write_text(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dispatch-only", action="store_true", help="only the per-operation costs")
    parser.add_argument("--half", action="store_true", help="bf16 weights: MLX's product against ours")
    args = parser.parse_args(argv)
    if args.half:
        os.environ["MLXRUNNER_HALF_MATVEC"] = "1"  # read once, at the first product
        return main_half(args.out)
    report: dict = {"dispatch_us": dispatch_costs(), "products": [], "step_us": {}}
    if args.dispatch_only:
        args.out.write_text(json.dumps(report, indent=1))
        return 0
    for model, shapes in SHAPES.items():
        step: dict[str, float] = {}
        for n, k, count in shapes:
            for rows in [1, 4, 7, 8, 16] if n in GATE_UP else [1]:
                figures = measure(n, k, 4, rows)
                report["products"].append({"model": model, "n": n, "k": k, "bits": 4, "rows": rows, **figures})
                show(model, n, k, 4, rows, figures)
                if rows == 1:
                    for side, f in figures.items():
                        step[side] = step.get(side, 0.0) + count * f["us"]
            mx.clear_cache()
        report["step_us"][model] = step
        print(f"{model}: one decode step's products (us): " + ", ".join(f"{s} {t:.0f}" for s, t in step.items()))
    names = list(report["step_us"][next(iter(SHAPES))])
    score = {name: sum(report["step_us"][m][name] / min(report["step_us"][m].values()) for m in SHAPES)
             for name in names}
    report["best"] = min(score, key=score.get)
    print("least time over both shapes:", report["best"], {name: round(v, 3) for name, v in score.items()})
    for model, shapes in SHAPES.items():
        n, k, _ = next(shape for shape in shapes if shape[0] in GATE_UP)
        for rows in (1, 8):
            figures = measure(n, k, 8, rows, variants=[(2, 2), (4, 2)])
            report["products"].append({"model": model, "n": n, "k": k, "bits": 8, "rows": rows, **figures})
            show(model, n, k, 8, rows, figures)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
