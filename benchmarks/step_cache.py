"""The step cache's speed-up and its cost in quality, measured the same way on the CPU (benchmarks/cpu/
test_step_cache.py, small shapes) and on a GPU (benchmarks/gpu/step_cache_bench.py, full-size shapes).

Each run makes the same image (same prompt, same injected initial latents) without the cache and with it at
each threshold; a cached image is compared with the uncached one (PSNR and mean |difference| over 8-bit
RGB). The models are random-weight: how the first block's residual moves between steps, and so which
thresholds skip how many steps, is not what trained weights do. The numbers to read together are the
share of evaluations skipped, the speed-up it buys, and the image difference it costs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PROMPT = "a red fox in fresh snow at golden hour, 35mm photo, shallow depth of field"


def base_variant(folder: Path, out: Path) -> Path:
    """`folder`'s pipeline as its undistilled (base) model: the same components, linked, under a
    model_index.json that says is_distilled false, so the pipeline runs its base defaults and CFG."""
    out.mkdir(parents=True, exist_ok=True)
    for part in folder.iterdir():
        if part.is_dir() and not (out / part.name).exists():
            os.symlink(part.resolve(), out / part.name)
    index = json.loads((folder / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
    return out


def quality(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR (dB; inf when equal) and mean |difference| (levels of 255) of two 8-bit RGB images."""
    diff = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff**2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    return {"psnr_db": psnr, "mean_abs_diff": float(np.mean(np.abs(diff)))}


@dataclass
class Row:
    model: str
    size: int
    steps: int
    threshold: float  # 0: uncached
    seconds: float  # median over the rounds, whole image (text in, pixels out)
    denoise_seconds: float
    computed: int  # transformer evaluations run in full (FLUX.2's CFG: two a step)
    skipped: int
    speedup: float = 1.0  # uncached denoise seconds / this denoise seconds
    psnr_db: float = math.inf
    mean_abs_diff: float = 0.0


def run(pipe, size: int, steps: int, latents: np.ndarray, threshold: float):
    """One image: (pixels, seconds, denoise seconds, computed, skipped)."""
    start = time.perf_counter()
    result = pipe.run(PROMPT, width=size, height=size, steps=steps, latents=latents,
                      cache_threshold=threshold or None)
    seconds = time.perf_counter() - start
    cache = result.step_cache
    evaluations = steps * (2 if pipe.architecture == "Flux2KleinPipeline" and result.guidance > 1 else 1)
    computed, skipped = (cache.computed, cache.skipped) if cache else (evaluations, 0)
    return np.asarray(result.image), seconds, result.timings["denoise"], computed, skipped


def sweep(pipe, model: str, size: int, steps: int, latents: np.ndarray, thresholds: list[float],
          rounds: int) -> list[Row]:
    """The uncached image, then one per threshold; rounds alternate over the thresholds so drift hits all."""
    run(pipe, size, 1, latents, 0)  # warm-up
    cases = [0.0, *thresholds]
    timings: dict[float, list[tuple[float, float]]] = {t: [] for t in cases}
    images, counts = {}, {}
    for _ in range(rounds):
        for threshold in cases:
            pixels, seconds, denoise, computed, skipped = run(pipe, size, steps, latents, threshold)
            timings[threshold].append((seconds, denoise))
            images[threshold], counts[threshold] = pixels, (computed, skipped)
    rows = []
    for threshold in cases:
        seconds = statistics.median(s for s, _ in timings[threshold])
        denoise = statistics.median(d for _, d in timings[threshold])
        rows.append(Row(model, size, steps, threshold, seconds, denoise, *counts[threshold],
                        **quality(images[threshold], images[0.0])))
    for row in rows:
        row.speedup = rows[0].denoise_seconds / row.denoise_seconds
    return rows


def table(rows: list[Row]) -> list[str]:
    header = (f"{'model':<10}{'size':>6}{'steps':>6}{'threshold':>10}{'computed':>9}{'skipped':>8}{'s/image':>9}"
              f"{'denoise s':>10}{'speed-up':>9}{'PSNR dB':>9}{'mean|Δ|':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.model:<10}{r.size:>6}{r.steps:>6}{r.threshold:>10g}{r.computed:>9}{r.skipped:>8}"
                     f"{r.seconds:>9.2f}{r.denoise_seconds:>10.2f}{r.speedup:>8.2f}x{r.psnr_db:>9.1f}"
                     f"{r.mean_abs_diff:>8.2f}")
    return lines


def as_json(rows: list[Row]) -> list[dict]:
    return [{**asdict(r), "psnr_db": None if math.isinf(r.psnr_db) else r.psnr_db} for r in rows]
