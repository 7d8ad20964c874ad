"""The step cache on a GPU, full-size random-weight shapes: speed-up and image difference against the
uncached image, per threshold (benchmarks/step_cache.py says how).

    python -m benchmarks.gpu.step_cache_bench --models-dir DIR --out FILE.json \
        [--size 1024] [--steps 50] [--thresholds 0.05,0.1,0.2,0.4] [--rounds 1] [--models zimage,klein]

Expects the folders benchmarks/gpu/image_models.py builds (DIR/zimage-turbo, DIR/klein-4b) and runs them as
their base models (`base_variant`: the same weights under is_distilled false), so Z-Image runs 50 steps
with CFG batched into one call and Klein 50 steps with CFG as two calls a step, each model's base defaults
for guidance. Prints the table and writes every row to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import flux2_models, step_cache, zimage_models

FOLDERS = {"zimage": ("zimage-turbo", zimage_models), "klein": ("klein-4b", flux2_models)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--thresholds", default="0.05,0.1,0.2,0.4")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--models", default="zimage,klein")
    args = parser.parse_args()

    import mlx.core as mx

    import mlxrunner  # noqa: F401  (first: the CPU BLAS shim, harmless on a GPU)
    from mlxrunner.imagegen import load_pipeline

    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = []
    for model in args.models.split(","):
        name, shapes = FOLDERS[model]
        folder = step_cache.base_variant(args.models_dir / name, args.models_dir / f"{name}-base")
        pipe = load_pipeline(str(folder))
        latents = shapes.initial_latents(args.size, args.size)
        model_rows = step_cache.sweep(pipe, model, args.size, args.steps, latents, thresholds, args.rounds)
        print("\n".join(step_cache.table(model_rows)), flush=True)
        rows += model_rows
        del pipe
        mx.clear_cache()
    args.out.write_text(json.dumps({"device": str(mx.default_device()), "rows": step_cache.as_json(rows)}, indent=1))


if __name__ == "__main__":
    main()
