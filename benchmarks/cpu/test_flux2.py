"""FLUX.2 Klein: ours (C++ DiT + loop + VAE on MLX) against diffusers (torch) on the same weights, same run.

    HF_HUB_OFFLINE=1 python -m pytest benchmarks/cpu/test_flux2.py -q     # a few minutes on 2 CPU cores

Per image (prompt text in, 8-bit RGB out, 4 steps, the initial latents injected so both sides
compute the same image; asserted max |Δ| ≤ 2 levels) for text-to-image and for an edit with one
reference image, on a random-weight "small" Klein (benchmarks/flux2_models.py; float32 on CPU,
torch with 2 threads). Per step: the denoising phase alone (ours: the pipeline's own split;
diffusers: prompt_embeds given, output_type="latent") divided by the steps. Runs alternate ours
/ diffusers; each pair gives a ratio = diffusers seconds / our seconds (> 1: we are faster).
The full-size Klein-4B case (`-k klein4b`) needs a GPU and is skipped elsewhere. BENCH_PAIRS=n runs n pairs
(default 3): the per-image ratio moves by ±5 % from pair to pair on a 2-core machine.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import flux2_models
from benchmarks.cpu.test_zimage import CACHE, _gpu_available
from mlxrunner.imagegen import load_pipeline

torch = pytest.importorskip("torch", reason="the peer, diffusers, needs torch")
diffusers = pytest.importorskip("diffusers", reason="the peer, diffusers, is not installed")

PROMPT = "a red fox in fresh snow, golden hour, 35mm photo"
STEPS = 4
SIZE = (256, 256)
PAIRS = int(os.environ.get("BENCH_PAIRS", 3))
RESULTS: dict[tuple[str, str], dict] = {}
REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "goldens" / "flux2_klein" / "ref_a.png"


class Sides:
    def __init__(self, folder: Path, dtype: str):
        torch.set_num_threads(2)
        self.ours = load_pipeline(str(folder))
        self.peer = diffusers.Flux2KleinPipeline.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        self.device = "cuda" if torch.cuda.is_available() and dtype == "bfloat16" else "cpu"
        self.peer.to(self.device)
        self.peer.set_progress_bar_config(disable=True)

    def run_ours(self, width, height, steps, images):
        # Each image encodes its prompt, as the peer's does (a kept embedding would skip it).
        self.ours.prompt_embeddings.clear()
        start = time.perf_counter()
        result = self.ours.run(PROMPT, width=width, height=height, steps=steps, images=images,
                               latents=flux2_models.initial_latents(width, height))
        return time.perf_counter() - start, np.asarray(result.image), result.timings["denoise"]

    def run_peer(self, width, height, steps, images):
        latents = torch.from_numpy(flux2_models.initial_latents(width, height)).to(self.device)
        kwargs = dict(width=width, height=height, num_inference_steps=steps, latents=latents)
        if images:
            kwargs["image"] = images
        with torch.inference_mode():
            start = time.perf_counter()
            image = self.peer(prompt=PROMPT, output_type="np", **kwargs).images[0]
            self._sync()
            total = time.perf_counter() - start
            embeds, _ = self.peer.encode_prompt(PROMPT, device=self.device)
            start = time.perf_counter()
            self.peer(prompt_embeds=embeds, output_type="latent", **kwargs)
            self._sync()
            denoise = time.perf_counter() - start
        return total, np.round(image * 255).astype(np.uint8), denoise

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


@pytest.fixture(scope="module")
def small_sides() -> Sides:
    return Sides(flux2_models.build(flux2_models.SMALL, CACHE / "flux2-klein-small"), "float32")


def measure(sides: Sides, label: str, width: int, height: int, steps: int, images, pairs: int) -> None:
    sides.run_ours(width, height, 1, images)  # warm-up
    sides.run_peer(width, height, 1, images)
    rows = []
    for _ in range(pairs):
        o_total, o_pixels, o_denoise = sides.run_ours(width, height, steps, images)
        p_total, p_pixels, p_denoise = sides.run_peer(width, height, steps, images)
        diff = int(np.abs(o_pixels.astype(int) - p_pixels.astype(int)).max())
        rows.append((o_total, p_total, o_denoise / steps, p_denoise / steps, diff))
    med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
    RESULTS[(label, f"{width}x{height}")] = {
        "ours_image_s": med(0), "peer_image_s": med(1), "image_ratio": statistics.median(r[1] / r[0] for r in rows),
        "ours_step_s": med(2), "peer_step_s": med(3), "step_ratio": statistics.median(r[3] / r[2] for r in rows),
        "max_pixel_diff": max(r[4] for r in rows)}


@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit-1-ref"])
def test_small_klein_paired(small_sides, edit):
    images = [Image.open(REFERENCE).convert("RGB")] if edit else None
    measure(small_sides, "small " + ("edit" if edit else "t2i"), *SIZE, STEPS, images, PAIRS)
    assert RESULTS[("small " + ("edit" if edit else "t2i"), f"{SIZE[0]}x{SIZE[1]}")]["max_pixel_diff"] <= 2


@pytest.mark.skipif(not _gpu_available(), reason="the full-size Klein-4B case needs a GPU (MLX CUDA or Metal)")
@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit-1-ref"])
def test_klein4b_shaped_1024(edit):
    sides = Sides(flux2_models.build(flux2_models.KLEIN_4B, CACHE / "flux2-klein-4b-shaped"), "bfloat16")
    images = [Image.open(REFERENCE).convert("RGB").resize((1024, 1024))] if edit else None
    measure(sides, "klein4b " + ("edit" if edit else "t2i"), 1024, 1024, 4, images, 1)


def pytest_terminal_summary_flux2(write) -> None:
    if not RESULTS:
        return
    write("")
    title = " FLUX.2 Klein: ours vs diffusers (same weights, same latents; ratio > 1: we are faster) "
    write("=" * 20 + title + "=" * 20)
    write(f"torch={torch.__version__} (threads {torch.get_num_threads()}), diffusers={diffusers.__version__}, "
          f"steps={STEPS}, pairs={PAIRS}")
    header = (f"{'case':<14}{'size':>10}{'ours s/img':>12}{'diff s/img':>12}{'ratio':>8}{'ours s/step':>13}"
              f"{'diff s/step':>13}{'ratio':>8}{'max |Δ|':>9}")
    write(header)
    write("-" * len(header))
    for (case, size), r in RESULTS.items():
        write(f"{case:<14}{size:>10}{r['ours_image_s']:>12.3f}{r['peer_image_s']:>12.3f}{r['image_ratio']:>8.2f}"
              f"{r['ours_step_s']:>13.4f}{r['peer_step_s']:>13.4f}{r['step_ratio']:>8.2f}{r['max_pixel_diff']:>9d}")
