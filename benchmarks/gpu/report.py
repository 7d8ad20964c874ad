"""Collect the GPU benchmark's per-side results into OUT/results.json and OUT/table.md.

    python -m benchmarks.gpu.report --work WORK --out OUT

Images: ratio = peer seconds / our seconds (> 1: we are faster); the images of every side are compared
with ours (max and mean |Δ| in levels of 255, PSNR): the sides start from the same latents and weights,
so they compute the same image up to bf16 rounding. LLM: llm_bench's own table (ratio = ours / mlx-lm).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
from datetime import date
from pathlib import Path

import numpy as np

IMAGE_CASES = [("zimage-turbo-t2i", "Z-Image-Turbo-shaped, text-to-image, 1024², 9 steps"),
               ("klein-4b-t2i", "FLUX.2-klein-4B-shaped, text-to-image, 1024², 4 steps"),
               ("klein-4b-edit", "FLUX.2-klein-4B-shaped, 1 reference (1024²), 1024², 4 steps")]
PEERS = ["diffusers", "mflux"]
GIB = 2**30


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def compare_images(a: Path, b: Path) -> dict | None:
    from PIL import Image

    if not (a.exists() and b.exists()):
        return None
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        return {"shape_mismatch": [list(x.shape), list(y.shape)]}
    d = np.abs(x - y)
    mse = float((d**2).mean())
    return {"max_abs": int(d.max()), "mean_abs": float(d.mean()),
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)}


def image_rows(work: Path) -> tuple[list[str], dict]:
    lines = ["| case | side | s/image | encode s | denoise s | decode s | peak GPU GiB | ratio (peer/ours) | "
             "image vs ours |", "|" + "---|" * 9]
    data = {}
    for label, title in IMAGE_CASES:
        sides = {side: load_json(work / f"image-{label}-{side}.json") for side in ["ours", *PEERS]}
        data[label] = {"title": title, "sides": sides, "image_vs_ours": {}}
        ours = sides["ours"]
        for side, r in sides.items():
            if r is None:
                continue
            name = f"{label} ({title})" if side == "ours" else ""
            if r.get("error") and "total_s" not in r:
                lines.append(f"| {name} | {side} | error: {r['error'][:120]} | | | | | | |")
                continue
            ratio, similarity = "", ""
            if side != "ours" and ours and not ours.get("error"):
                ratio = f"**{r['total_s'] / ours['total_s']:.2f}×**"
                cmp = compare_images(work / f"image-{label}-ours.png", work / f"image-{label}-{side}.png")
                data[label]["image_vs_ours"][side] = cmp
                if cmp and "max_abs" in cmp:
                    similarity = f"max {cmp['max_abs']}, mean {cmp['mean_abs']:.2f}, {cmp['psnr_db']:.1f} dB"
            if r.get("from_warmup_only"):
                side = f"{side} (warm-up only: its timed rounds hit the time limit)"
            peak = r.get("peak_gpu_bytes")
            lines.append(f"| {name} | {side} | {r['total_s']:.3f} | {r['encode_s']:.3f} | {r['denoise_s']:.3f} | "
                         f"{r['decode_s']:.3f} | {peak / GIB:.1f} | {ratio} | {similarity} |" if peak else
                         f"| {name} | {side} | {r['total_s']:.3f} | {r['encode_s']:.3f} | {r['denoise_s']:.3f} | "
                         f"{r['decode_s']:.3f} | - | {ratio} | {similarity} |")
    return lines, data


def environment() -> dict:
    env = {"date": date.today().isoformat(), "python": platform.python_version()}
    try:
        env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=20).stdout.strip()
    except OSError:
        env["gpu"] = None
    import importlib.metadata as md

    for dist in ("mlx", "mlx-cuda-13", "mlx-lm", "mflux", "torch", "diffusers", "transformers", "mlxrunner"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    return env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = environment()
    lines = [f"{env['date']}, {env['gpu']}; " + ", ".join(f"{k} {v}" for k, v in env.items()
                                                            if k not in ("date", "gpu") and v), ""]
    image_lines, images = image_rows(args.work)
    lines += ["### Images (bf16, random weights at full size, same weights and initial latents on every side)", "",
              *image_lines, ""]
    llm = load_json(args.work / "llm.json")
    if llm is not None:
        from benchmarks.gpu.llm_bench import table

        lines += ["### LLM (bf16, random weights at full size; ratio = ours / mlx-lm)", "", table(llm), ""]
    (args.out / "table.md").write_text("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps({"environment": env, "images": images, "llm": llm},
                                                      indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
