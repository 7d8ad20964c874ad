"""Z-Image: ours (C++ DiT + loop + VAE on MLX) against diffusers (torch) on the same weights, same run.

    HF_HUB_OFFLINE=1 python -m pytest benchmarks/cpu/test_zimage.py -q     # ~4 minutes on 2 CPU cores

What is timed, per image size, for a random-weight quarter-width Z-Image ("small" in
benchmarks/zimage_models.py; float32 on CPU, torch with 2 threads):
- per image: prompt text in, 8-bit RGB image out, 4 steps, no CFG (Turbo's way), the initial
  latents injected so both sides compute the same image (asserted: max |Δ| ≤ 2 levels);
- per step: the denoising phase alone divided by the steps (ours: the pipeline's own split;
  diffusers: the pipeline with prompt_embeds given and output_type="latent");
- peak memory: one subprocess per side (benchmarks/cpu/zimage_memory.py), peak RSS.
Runs alternate ours / diffusers and each pair gives one ratio (this VM's speed drifts); the
table shows medians. ratio = diffusers seconds / our seconds (> 1: we are faster).

The full-size Z-Image-Turbo case (`-k turbo`) needs a GPU (MLX CUDA or Metal) and ~40 GB of disk
and memory; it is skipped elsewhere. See benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from benchmarks import zimage_models
from mlxrunner.imagegen import load_pipeline

torch = pytest.importorskip("torch", reason="the peer, diffusers, needs torch")
diffusers = pytest.importorskip("diffusers", reason="the peer, diffusers, is not installed")

PROMPT = "a red fox in fresh snow, golden hour, 35mm photo"
STEPS = 4
SIZES = [(256, 256), (512, 384)]
PAIRS = 3
CACHE = Path(os.environ.get("MLXRUNNER_BENCH_CACHE", Path.home() / ".cache" / "mlxrunner-bench"))
RESULTS: dict[tuple[str, str], dict] = {}


def _gpu_available() -> bool:
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


@pytest.fixture(scope="module")
def small_folder() -> Path:
    return zimage_models.build(zimage_models.SMALL, CACHE / "zimage-small")


class Sides:
    """Both pipelines loaded once; each call makes one image and returns (seconds, pixels, denoise seconds)."""

    def __init__(self, folder: Path, dtype: str):
        torch.set_num_threads(2)
        self.ours = load_pipeline(str(folder))
        self.peer = diffusers.ZImagePipeline.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        device = "cuda" if torch.cuda.is_available() and dtype == "bfloat16" else "cpu"
        self.peer.to(device)
        self.device = device
        self.peer.set_progress_bar_config(disable=True)

    def run_ours(self, width: int, height: int, steps: int):
        # Each image encodes its prompt, as the peer's does (a kept embedding would skip it).
        self.ours.prompt_embeddings.clear()
        start = time.perf_counter()
        result = self.ours.run(PROMPT, width=width, height=height, steps=steps, guidance=0.0,
                               latents=zimage_models.initial_latents(width, height))
        return time.perf_counter() - start, np.asarray(result.image), result.timings["denoise"]

    def run_peer(self, width: int, height: int, steps: int):
        latents = torch.from_numpy(zimage_models.initial_latents(width, height)).to(self.device)
        with torch.inference_mode():
            start = time.perf_counter()
            image = self.peer(PROMPT, width=width, height=height, num_inference_steps=steps, guidance_scale=0.0,
                              latents=latents, output_type="np").images[0]
            self._sync()
            total = time.perf_counter() - start
            embeds, _ = self.peer.encode_prompt(PROMPT, do_classifier_free_guidance=False, device=self.device)
            start = time.perf_counter()
            self.peer(prompt_embeds=embeds, width=width, height=height, num_inference_steps=steps, guidance_scale=0.0,
                      latents=latents, output_type="latent")
            self._sync()
            denoise = time.perf_counter() - start
        return total, np.round(image * 255).astype(np.uint8), denoise

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def peak_memory(side: str, folder: Path, width: int, height: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.cpu.zimage_memory", side, str(folder), str(width),
                          str(height),
                          str(steps)], capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_sides(small_folder) -> Sides:
    return Sides(small_folder, "float32")


@pytest.mark.parametrize("width, height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_small_model_paired(small_sides, small_folder, width, height):
    sides = small_sides
    sides.run_ours(width, height, 1)  # warm-up: first-call allocations, thread pools
    sides.run_peer(width, height, 1)
    image_ratios, step_ratios, ours_s, peer_s, ours_step, peer_step = [], [], [], [], [], []
    for _ in range(PAIRS):
        o_total, o_pixels, o_denoise = sides.run_ours(width, height, STEPS)
        p_total, p_pixels, p_denoise = sides.run_peer(width, height, STEPS)
        diff = np.abs(o_pixels.astype(int) - p_pixels.astype(int)).max()
        assert diff <= 2, f"the two sides made different images (max |Δ| {diff} levels)"
        image_ratios.append(p_total / o_total)
        step_ratios.append(p_denoise / o_denoise)
        ours_s.append(o_total), peer_s.append(p_total)
        ours_step.append(o_denoise / STEPS), peer_step.append(p_denoise / STEPS)
    RESULTS[("small", f"{width}x{height}")] = {
        "ours_image_s": statistics.median(ours_s), "peer_image_s": statistics.median(peer_s),
        "image_ratio": statistics.median(image_ratios), "ours_step_s": statistics.median(ours_step),
        "peer_step_s": statistics.median(peer_step), "step_ratio": statistics.median(step_ratios),
        "ours_mem": peak_memory("ours", small_folder, width, height, STEPS),
        "peer_mem": peak_memory("diffusers", small_folder, width, height, STEPS),
    }


@pytest.mark.skipif(not _gpu_available(), reason="the full-size Z-Image-Turbo case needs a GPU (MLX CUDA or Metal)")
def test_turbo_shaped_1024(tmp_path_factory):
    folder = zimage_models.build(zimage_models.TURBO, CACHE / "zimage-turbo-shaped")
    sides = Sides(folder, "bfloat16")
    width = height = 1024
    sides.run_ours(width, height, 1)
    sides.run_peer(width, height, 1)
    o_total, o_pixels, o_denoise = sides.run_ours(width, height, 9)
    p_total, p_pixels, p_denoise = sides.run_peer(width, height, 9)
    RESULTS[("turbo", "1024x1024")] = {"ours_image_s": o_total, "peer_image_s": p_total,
                                       "image_ratio": p_total / o_total, "ours_step_s": o_denoise / 9,
                                       "peer_step_s": p_denoise / 9, "step_ratio": p_denoise / o_denoise,
                                       "max_pixel_diff": int(np.abs(o_pixels.astype(int) - p_pixels.astype(int)).max())}


def pytest_terminal_summary_zimage(write) -> None:
    if not RESULTS:
        return
    write("")
    write("=" * 20 + " Z-Image: ours vs diffusers (same weights, same latents; ratio > 1: we are faster) " + "=" * 20)
    write(f"torch={torch.__version__} (threads {torch.get_num_threads()}), diffusers={diffusers.__version__}, "
          f"steps={STEPS}, pairs={PAIRS}")
    header = (f"{'model':<8}{'size':>10}{'ours s/img':>12}{'diff s/img':>12}{'ratio':>8}{'ours s/step':>13}"
              f"{'diff s/step':>13}{'ratio':>8}{'ours peak MB':>14}{'diff peak MB':>14}")
    write(header)
    write("-" * len(header))
    for (model, size), r in RESULTS.items():
        om, pm = r.get("ours_mem", {}), r.get("peer_mem", {})
        write(f"{model:<8}{size:>10}{r['ours_image_s']:>12.3f}{r['peer_image_s']:>12.3f}{r['image_ratio']:>8.2f}"
              f"{r['ours_step_s']:>13.4f}{r['peer_step_s']:>13.4f}{r['step_ratio']:>8.2f}"
              f"{om.get('peak_rss_mb', float('nan')):>14.0f}{pm.get('peak_rss_mb', float('nan')):>14.0f}")
