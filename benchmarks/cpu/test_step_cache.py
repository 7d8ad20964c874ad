"""The step cache on the CPU: small random-weight Z-Image and FLUX.2 Klein, run as base models (CFG),
50 steps, each threshold against the uncached image of the same run (benchmarks/step_cache.py says how).

    HF_HUB_OFFLINE=1 python -m pytest benchmarks/cpu/test_step_cache.py -q     # ~3 minutes on 2 CPU cores

The models are benchmarks/{zimage,flux2}_models.SMALL (built once with torch + diffusers into the bench cache),
float32, 64², the initial latents injected. The table at the end gives, per threshold, the evaluations run
and skipped, seconds per image and for the denoise alone, the denoise speed-up, and PSNR / mean |Δ| (levels)
against the uncached image. Random weights move the first block's residual by about 1x a step, far more
than trained models do, so the thresholds that skip steps here are large; benchmarks/README.md has the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import flux2_models, step_cache, zimage_models
from mlxrunner.imagegen import load_pipeline

SIZE = 64
STEPS = 50
THRESHOLDS = [0.2, 0.5, 1.0, 1.5]
CACHE = Path(os.environ.get("MLXRUNNER_BENCH_CACHE", Path.home() / ".cache" / "mlxrunner-bench"))
MODELS = {"zimage": (zimage_models, "zimage-small"), "klein": (flux2_models, "klein-small")}
RESULTS: list[step_cache.Row] = []


@pytest.mark.timeout(1800)  # 250 denoising steps a model: past the suite's 300 s on a busy machine
@pytest.mark.parametrize("model", list(MODELS))
def test_step_cache_sweep(model):
    shapes, name = MODELS[model]
    folder = shapes.build(shapes.SMALL, CACHE / name)
    pipe = load_pipeline(str(step_cache.base_variant(folder, CACHE / f"{name}-base")))
    rows = step_cache.sweep(pipe, model, SIZE, STEPS, shapes.initial_latents(SIZE, SIZE), THRESHOLDS, rounds=1)
    evaluations = STEPS * (2 if model == "klein" else 1)  # Klein's CFG: two calls a step
    for row in rows:
        assert row.computed + row.skipped == evaluations and row.computed >= 1 + (model == "klein")
    assert rows[0].psnr_db == float("inf")  # the uncached image is its own reference
    RESULTS.extend(rows)


def pytest_terminal_summary_step_cache(write) -> None:
    if not RESULTS:
        return
    write("")
    write("=" * 20 + " step cache: cached vs uncached in one run (denoise speed-up; PSNR vs uncached) " + "=" * 20)
    for line in step_cache.table(RESULTS):
        write(line)
