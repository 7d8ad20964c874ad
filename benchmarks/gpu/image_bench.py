"""One side of the full-size image benchmark, in its own process (so peak GPU memory is that side's alone).

    python -m benchmarks.gpu.image_bench --side ours|diffusers --model zimage|klein --folder DIR \
        --size 1024 --steps 9 --rounds 3 --out FILE.json [--reference PNG] [--image-out PNG]

Per round: prompt text in, 8-bit RGB image out, the initial latents injected (the same seeded normal
draw on every side, in diffusers' `latents=` layout), so every side computes the same image; one
warm-up round first. Times per round: end to end, and the split text encode / denoise / VAE decode
(ours: the pipeline's own timings; diffusers: its text encoder and VAE calls timed with CUDA syncs
around them, denoise = the rest). Peak memory: MLX's or torch's allocator peak over the timed rounds
(weights included). The last image is written to --image-out for the cross-check in report.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks import flux2_models, zimage_models

PROMPT = "a red fox in fresh snow at golden hour, 35mm photo, shallow depth of field"


def initial_latents(model: str, size: int) -> np.ndarray:
    return (zimage_models if model == "zimage" else flux2_models).initial_latents(size, size)


def reference_image(size: int):
    """A deterministic photo-like reference: smooth colour gradients plus mild noise."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(1)
    rgb = np.stack([0.5 + 0.5 * np.sin(6 * x + 1), 0.5 + 0.5 * np.cos(5 * y), x * y], axis=-1)
    rgb = np.clip(rgb + 0.03 * rng.standard_normal(rgb.shape), 0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


# --- ours -------------------------------------------------------------------------------------------


def run_ours(args, references) -> dict:
    import mlx.core as mx

    import mlxrunner  # noqa: F401  (first: the CPU BLAS shim, harmless on a GPU)
    from mlxrunner.imagegen import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(args.folder)
    load_s = time.perf_counter() - start
    latents = initial_latents(args.model, args.size)
    kwargs = dict(width=args.size, height=args.size, steps=args.steps, latents=latents)
    if references:
        kwargs["images"] = references
    if args.model == "zimage":
        kwargs["guidance"] = 0.0

    def one():
        # Each image encodes its prompt, as the peer's does (a kept embedding would skip it).
        pipe.prompt_embeddings.clear()
        mx.synchronize()
        t0 = time.perf_counter()
        result = pipe.run(PROMPT, **kwargs)
        image = np.asarray(result.image)
        return time.perf_counter() - t0, result.timings, image, max(result.peak_memory.values())

    one()  # warm-up
    rows, image, peak = [], None, 0
    for _ in range(args.rounds):
        # The pipeline resets MLX's peak at each phase and reports each phase's: the run's peak is their largest.
        total, timings, image, run_peak = one()
        peak = max(peak, run_peak)
        rows.append({"total": total, "encode": timings["encode"], "denoise": timings["denoise"],
                     "decode": timings["decode"]})
    return {"load_s": load_s, "rows": rows, "peak_gpu_bytes": int(peak), "image": image,
            "versions": {"mlx": mx.__version__, "mlxrunner": mlxrunner.__version__}}


# --- diffusers --------------------------------------------------------------------------------------


class PhaseClock:
    """Wraps methods so each call is timed between CUDA syncs and accumulated under a phase name."""

    def __init__(self, torch):
        self.torch = torch
        self.spent: dict[str, float] = {}

    def sync(self) -> None:
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            out = original(*a, **k)
            self.sync()
            self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - t0
            return out

        setattr(owner, name, timed)


def run_diffusers(args, references) -> dict:
    import diffusers
    import torch

    cls = diffusers.ZImagePipeline if args.model == "zimage" else diffusers.Flux2KleinPipeline
    # bf16 on the GPU, as a user runs it; float32 on a CPU (a smoke test of this script).
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    clock = PhaseClock(torch)
    start = time.perf_counter()
    pipe = cls.from_pretrained(args.folder, torch_dtype=dtype).to(device)
    clock.sync()
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    clock.wrap(pipe, "encode_prompt", "encode")
    clock.wrap(pipe.vae, "decode", "decode")
    if references:
        clock.wrap(pipe.vae, "encode", "encode")  # the reference image's latents: text+image conditioning
    latents = torch.from_numpy(initial_latents(args.model, args.size)).to(device)
    kwargs = dict(width=args.size, height=args.size, num_inference_steps=args.steps, latents=latents,
                  output_type="np")
    if args.model == "zimage":
        kwargs["guidance_scale"] = 0.0
    if references:
        kwargs["image"] = references

    def one():
        clock.spent.clear()
        clock.sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = pipe(prompt=PROMPT, **kwargs).images[0]
        image = np.round(out * 255).clip(0, 255).astype(np.uint8)
        clock.sync()
        total = time.perf_counter() - t0
        encode, decode = clock.spent.get("encode", 0.0), clock.spent.get("decode", 0.0)
        return {"total": total, "encode": encode, "decode": decode, "denoise": total - encode - decode}, image

    one()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows, image = [], None
    for _ in range(args.rounds):
        row, image = one()
        rows.append(row)
    peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    return {"load_s": load_s, "rows": rows, "peak_gpu_bytes": peak, "image": image,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}


def summarize(result: dict) -> dict:
    rows = result.pop("rows")
    medians = {f"{k}_s": statistics.median(r[k] for r in rows) for k in ("total", "encode", "denoise", "decode")}
    return {**result, **medians, "rounds": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["ours", "diffusers"], required=True)
    parser.add_argument("--model", choices=["zimage", "klein"], required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--edit", action="store_true", help="one reference image of --size (Klein)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--image-out")
    args = parser.parse_args(argv)
    references = [reference_image(args.size)] if args.edit else None
    record = {"side": args.side, "model": args.model, "size": args.size, "steps": args.steps, "edit": args.edit}
    try:
        result = summarize((run_ours if args.side == "ours" else run_diffusers)(args, references))
        image = result.pop("image")
        if args.image_out:
            from PIL import Image

            Image.fromarray(image).save(args.image_out)
        record.update(result, error=None)
    except Exception as exc:  # one failing side must not stop the run: recorded, exit 0
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-4000:]
        print(record["traceback"], flush=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k not in ("rounds", "traceback")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
