"""The full-size image pipelines of the GPU benchmark, built once into --models-dir.

    python -m benchmarks.gpu.image_models --models-dir DIR

- DIR/zimage-turbo: Z-Image-Turbo's architecture (benchmarks/zimage_models.TURBO), bf16;
- DIR/klein-4b: FLUX.2-klein-4B's (benchmarks/flux2_models.KLEIN_4B), bf16.
Both link DIR/qwen3-4b (the LLM benchmark's Qwen3-4B-shaped folder, built here if missing) as their
text encoder: the real pipelines use Qwen3-4B too, and one copy saves 16 GB of disk. Weights are
diffusers' / transformers' own random init on CUDA, written with save_pretrained.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import flux2_models, zimage_models
from benchmarks.gpu import llm_shapes


def build_all(models_dir: Path) -> dict[str, Path]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    text_encoder = llm_shapes.qwen3_4b(models_dir / "qwen3-4b")
    folders = {}
    for name, build in (("zimage-turbo", lambda f: zimage_models.build(zimage_models.TURBO, f, device, text_encoder)),
                        ("klein-4b", lambda f: flux2_models.build(flux2_models.KLEIN_4B, f, device, text_encoder))):
        start = time.perf_counter()
        folders[name] = build(models_dir / name)
        print(f"{name}: {folders[name]} ({time.perf_counter() - start:.1f} s)", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return folders


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", type=Path, required=True)
    build_all(parser.parse_args().models_dir)


if __name__ == "__main__":
    main()
