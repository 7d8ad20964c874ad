"""Quantized image models against their float source: seconds per image, peak memory, and how far the image moves.

    python -m benchmarks.gpu.image_quant FOLDER --out FILE.json [--bits 8,4] [--size 1024] [--steps 9] [--seeds 1,2]

FOLDER is a float (bf16) diffusers folder (Z-Image or FLUX.2 Klein; benchmarks/gpu/image_models.py builds the
full-size random-weight ones). Each --bits value is quantized with `mlxrunner quantize` (affine, group 64, its
default policy: VAE, embedders and norms float, 8-bit promotions in 4-bit mode) into FOLDER-qB, unless that
exists. Then, one fresh process per variant (so its load and peak memory are its own): load (the warm-up
included), one image per seed at SIZE² and STEPS steps, timed after a first untimed image. Reported per variant:
load seconds, seconds per image (median), MLX's peak memory, arrays held after load, and per seed the PSNR and
mean absolute difference (in levels of 255) of the quantized image against the float one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np
import mlxrunner  # noqa: F401
import mlx.core as mx
from mlxrunner.imagegen import load_pipeline
folder, size, steps, seeds, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
started = time.perf_counter()
pipeline = load_pipeline(folder)
load_s = time.perf_counter() - started
held = mx.get_active_memory()
pipeline.run("a red fox in fresh snow", width=size, height=size, steps=steps, seed=seeds[0])  # untimed
seconds, images, peak = [], [], 0
for seed in seeds:
    pipeline.prompt_embeddings.clear()  # each image encodes its prompt, as diffusers' does
    started = time.perf_counter()
    result = pipeline.run("a red fox in fresh snow", width=size, height=size, steps=steps, seed=seed)
    seconds.append(time.perf_counter() - started)
    images.append(np.asarray(result.image.convert("RGB")))
    peak = max([peak, *result.peak_memory.values()])  # the pipeline measures each phase's peak itself
np.save(out, np.stack(images))
print(json.dumps({"load_s": load_s, "seconds": seconds, "held_bytes": held, "peak_bytes": peak}))
"""


def quantize(folder: Path, bits: int) -> Path:
    target = folder.with_name(f"{folder.name}-q{bits}")
    if not (target / "model_index.json").exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlxrunner", "quantize", str(folder), str(target), "--bits", str(bits)],
                       check=True)
        print(f"[quantize] {target.name}: {time.perf_counter() - started:.1f} s", flush=True)
    return target


def run_variant(folder: Path, size: int, steps: int, seeds: list[int], images: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(size), str(steps), json.dumps(seeds),
                           str(images)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff ** 2))
    return {"psnr_db": float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse),
            "mean_abs_levels": float(np.mean(np.abs(diff))), "max_abs_levels": float(np.max(np.abs(diff)))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--seeds", default="1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {"float": args.folder} | {f"q{b}": quantize(args.folder, int(b)) for b in args.bits.split(",")}
    report: dict = {"folder": str(args.folder), "size": args.size, "steps": args.steps, "seeds": seeds, "variants": {}}
    pixels = {}
    for name, folder in variants.items():
        images = args.out.with_name(f"{args.out.stem}-{name}.npy")
        result = run_variant(folder, args.size, args.steps, seeds, images)
        if "error" not in result:
            result["s_per_image"] = statistics.median(result["seconds"])
            pixels[name] = np.load(images)
            if name != "float" and "float" in pixels:
                result["vs_float"] = [compare(q, f) for q, f in zip(pixels[name], pixels["float"])]
        report["variants"][name] = result
        print(name, json.dumps(result), flush=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
