"""The image rows' profile case for benchmarks/gpu/profile.py: the Z-Image denoiser's kernels per step
and each phase's peak memory, ours and diffusers'.

    python -m benchmarks.gpu.profile --models-dir DIR --out OUT --cases denoise [--denoise-steps 2] \
        [--denoise-size 1024]

Why: the image rows of benchmarks/README.md sit below their 1.25x goal against diffusers, with the
denoise phase ~90 % of an image, and ours peaks ~9 GiB above diffusers on the GPU; the VAE case of
profile.py covers only the decode. Both sides use DIR/zimage-turbo (Z-Image-Turbo-shaped), the
benchmark's prompt, 1024 x 1024 (--denoise-size) and the same initial latents (image_bench.initial_latents).

- Kernels: one call of `--denoise-steps` steps (default 2; a step costs the same whatever its sigma)
  under torch's profiler, after one warm-up call; figures per step. Ours: `_core.zimage_denoise` on
  prompt embeddings encoded once (the pipeline's own call, no classifier-free guidance, as Turbo
  runs); diffusers: ZImagePipeline(prompt_embeds=..., output_type="latent"), bf16, in a child process
  (torch's and MLX's CUDA allocations never share one). The unprofiled median of 3 calls is recorded.
- Queue-depth A/B: a 9-step `_core.zimage_denoise` at each queue depth in QUEUE_DEPTHS (its queue_depth argument)
  (0: no bound, as the loop ran before the queue existed, evaluated a step at a time; the default is 2;
  csrc/nn/eval_queue.h says why), one warm-up and the median seconds of 3 runs, and the peak
  memory above what is held of one more run. It measures what the bound costs in speed and saves in memory.
- Cache A/B: whole `pipe.run` images (9 steps) with MLX's buffer cache kept from the previous image (as a
  runner serves back-to-back requests) and released before each image (`mx.clear_cache()`, as the runner does
  once idle; until 2026-12-01 the pipeline itself released it at the end of every run), alternating, 3
  rounds each after a warm-up of each; phase medians. It measures what a fresh set of buffers costs an image.
- Memory: on a freshly loaded pipeline, the allocator's peak above what is already held, per phase:
  text encode, a 9-step denoise, VAE decode (ours: MLX's `get_peak_memory` after `reset_peak_memory`;
  diffusers: `max_memory_allocated` after `reset_peak_memory_stats`), and what the loaded weights hold.
"""

from __future__ import annotations

import time
from pathlib import Path

FOLDER = "zimage-turbo"
MEMORY_STEPS = 9  # as the benchmark's Z-Image row
QUEUE_DEPTHS = (0, 1, 2, 4)
GIB = 2**30


def _ours_pipeline(args):
    import mlx.core as mx

    from benchmarks.gpu.image_bench import PROMPT, initial_latents
    from mlxrunner.imagegen import load_pipeline

    pipe = load_pipeline(str(args.models_dir / FOLDER))
    weights_gib = mx.get_active_memory() / GIB
    caption, _ = pipe.embed_prompt(PROMPT)
    mx.eval(caption)
    noise = mx.array(initial_latents("zimage", args.denoise_size))
    return pipe, caption, noise, weights_gib


def _ours_denoise(pipe, caption, noise, steps: int, queue_depth: int | None = None):
    size = 8 * noise.shape[-1]
    import mlx.core as mx

    from mlxrunner import _core

    depth = _core.DEFAULT_DENOISE_QUEUE_DEPTH if queue_depth is None else queue_depth
    final = _core.zimage_denoise(pipe.transformer, noise, pipe.sigmas(steps, size, size), caption, None, 0.0, None,
                                 depth)
    mx.eval(final)
    mx.synchronize()
    return final


def ours_phase_memory(mx, pipe, noise, weights_gib: float) -> dict:
    """Peak GiB above what is held, per phase, on the MLX side."""
    from benchmarks.gpu.image_bench import PROMPT

    def peak_of(fn):
        mx.synchronize()
        mx.reset_peak_memory()
        held = mx.get_active_memory()
        result = fn()
        mx.synchronize()
        return result, (mx.get_peak_memory() - held) / GIB

    def encode():
        caption = pipe.embed_prompt(PROMPT)[0]
        mx.eval(caption)
        return caption

    caption, encode = peak_of(encode)
    final, denoise = peak_of(lambda: _ours_denoise(pipe, caption, noise, MEMORY_STEPS))
    _, decode = peak_of(lambda: pipe.vae.decode(final))
    return {"weights_gib": weights_gib, "encode_gib": encode, "denoise_gib": denoise, "decode_gib": decode}


def queue_depth_ab(mx, pipe, caption, noise, rounds: int = 3) -> dict:
    """Seconds and peak memory of a 9-step denoise per evaluation-queue depth."""
    import statistics

    def one(depth: int) -> float:
        started = time.perf_counter()
        _ours_denoise(pipe, caption, noise, MEMORY_STEPS, queue_depth=depth)
        return time.perf_counter() - started

    out = {}
    for depth in QUEUE_DEPTHS:
        one(depth)  # warm-up
        seconds = statistics.median(one(depth) for _ in range(rounds))
        mx.synchronize()
        mx.reset_peak_memory()
        held = mx.get_active_memory()
        one(depth)
        out[str(depth)] = {"seconds": seconds, "peak_gib": (mx.get_peak_memory() - held) / GIB}
        mx.clear_cache()
    return out


def cache_ab(mx, pipe, noise, rounds: int = 3) -> dict:
    """Per-phase medians of whole images with MLX's buffer cache kept and released before each."""
    import statistics

    import numpy as np

    from benchmarks.gpu.image_bench import PROMPT

    size = 8 * noise.shape[-1]
    latents = np.asarray(noise)
    timings: dict[str, list[dict]] = {"cache_kept": [], "released_before": []}

    def one(variant: str) -> dict:
        if variant == "released_before":
            mx.clear_cache()
        pipe.prompt_embeddings.clear()  # each image encodes its prompt, as diffusers' does
        mx.synchronize()
        started = time.perf_counter()
        result = pipe.run(PROMPT, width=size, height=size, steps=MEMORY_STEPS, guidance=0.0, latents=latents)
        return {**result.timings, "total": time.perf_counter() - started}

    for variant in timings:
        one(variant)  # warm-up
    for r in range(rounds):
        for variant in (list(timings) if r % 2 == 0 else list(timings)[::-1]):
            timings[variant].append(one(variant))
    mx.clear_cache()
    return {variant: {k: statistics.median(row[k] for row in rows) for k in rows[0]} | {"rounds": rows}
            for variant, rows in timings.items()}


def case_denoise(mx, args, report: dict, profiler, save, deadline: float, *, median_ms, free, diffusers_child,
                 log, error_text) -> None:
    """Ours in this process, then diffusers in a child; the helpers are profile.py's (passed in: this
    module is imported by it)."""
    steps = args.denoise_steps
    section = report.setdefault("denoise", {"settings": {
        "model": f"{FOLDER} (Z-Image-Turbo-shaped DiT)", "size": args.denoise_size, "profiled_steps": steps,
        "memory_steps": MEMORY_STEPS, "guidance": 0.0}})
    log("[denoise] ours")
    try:
        pipe, caption, noise, weights_gib = _ours_pipeline(args)
        _ours_denoise(pipe, caption, noise, steps)  # warm-up
        ours = {"unprofiled_ms_per_step": median_ms(lambda: _ours_denoise(pipe, caption, noise, steps), 3) / steps}
        ours["profile"] = profiler.run("denoise-ours", lambda: _ours_denoise(pipe, caption, noise, steps), per=steps)
        ours["memory"] = ours_phase_memory(mx, pipe, noise, weights_gib)
        ours["queue_depth_ab"] = queue_depth_ab(mx, pipe, caption, noise)
        ours["clear_cache_ab"] = cache_ab(mx, pipe, noise)
        section["ours"] = ours
        log(f"[denoise] ours: {ours['unprofiled_ms_per_step']:.1f} ms/step unprofiled, "
            f"{ours['profile']['kernels'] / steps:.0f} kernels/step; memory {ours['memory']}")
        del pipe, caption, noise
    except Exception:  # noqa: BLE001
        section["ours"] = {"error": error_text()}
        log(f"[denoise] ours ERROR\n{section['ours']['error']}")
    free(mx)
    save()
    extra = ["--denoise-steps", str(steps), "--denoise-size", str(args.denoise_size)]
    diffusers_child(section, "denoise", extra, args, deadline, 300)
    save()


def diffusers_side(args, profiler_cls, median_ms) -> dict:
    """The diffusers half, run in a child process (see the module docstring)."""
    import tempfile

    import diffusers
    import torch

    from benchmarks.gpu.image_bench import PROMPT, initial_latents

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # CPU: a smoke test
    steps = args.denoise_steps

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out: dict = {"device": device, "dtype": str(dtype), "torch": torch.__version__, "diffusers": diffusers.__version__}
    pipe = diffusers.ZImagePipeline.from_pretrained(str(args.models_dir / FOLDER), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    sync()
    weights = torch.cuda.memory_allocated() if cuda else None
    latents = torch.from_numpy(initial_latents("zimage", args.denoise_size)).to(device)

    def encode():
        with torch.inference_mode():
            embeds, _ = pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)
        sync()
        return embeds

    def denoise(embeds, n: int):
        with torch.inference_mode():
            size = args.denoise_size
            final = pipe(prompt_embeds=embeds, height=size, width=size, num_inference_steps=n, guidance_scale=0.0,
                         latents=latents, output_type="latent").images
        sync()
        return final

    def decode(final):
        # As ZImagePipeline's decode: cast to the VAE's dtype, z / scaling + shift.
        with torch.inference_mode():
            z = final.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
            image = pipe.vae.decode(z, return_dict=False)[0]
        sync()
        return image

    embeds = encode()
    denoise(embeds, steps)  # warm-up
    out["unprofiled_ms_per_step"] = median_ms(lambda: denoise(embeds, steps), 3) / steps
    with tempfile.TemporaryDirectory(prefix="denoise-prof-") as tmp:
        out["profile"] = profiler_cls(Path(tmp)).run("denoise-diffusers", lambda: denoise(embeds, steps), per=steps,
                                                     empty_note="torch profiler saw no CUDA kernels")
    def peak_of(fn):  # the phases run on a CPU too (a smoke test), where torch has no allocator peak
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() if cuda else 0
        result = fn()
        return result, (torch.cuda.max_memory_allocated() - held) / GIB if cuda else None

    embeds, encode_gib = peak_of(encode)
    final, denoise_gib = peak_of(lambda: denoise(embeds, MEMORY_STEPS))
    image, decode_gib = peak_of(lambda: decode(final))
    if not torch.isfinite(image).all():
        raise ValueError("the diffusers side decoded non-finite pixels")
    if cuda:
        out["memory"] = {"weights_gib": weights / GIB, "encode_gib": encode_gib, "denoise_gib": denoise_gib,
                         "decode_gib": decode_gib}
    return out


def markdown_lines(section: dict, *, head, row, missing_row, top_lines, f) -> list[str]:
    """This case's part of profile.md; the row and number formatters are profile.py's."""
    s = section["settings"]
    steps = s["profiled_steps"]
    lines = [f"## Denoise, {s['size']}x{s['size']} ({s['model']}; {steps} profiled steps; per step)", "",
             *head(["side"])]
    notes, memory = [], []
    for side in ("ours", "diffusers"):
        r = section.get(side, {})
        p = r.get("profile")
        if not p:
            lines.append(missing_row([side], r))
            continue
        lines.append(row([side], r.get("unprofiled_ms_per_step"), p, steps, 1, 1))
        notes += top_lines(side, p, steps, unit="ms/step")
        m = r.get("memory")
        if m:
            memory.append(f"| {side} | {f(m['weights_gib'])} | {f(m['encode_gib'])} | {f(m['denoise_gib'])} | "
                          f"{f(m['decode_gib'])} |")
    lines += ["", "Top kernels (count and ms per step):", "", *notes, ""]
    depths = section.get("ours", {}).get("queue_depth_ab")
    if depths:
        lines += [f"Ours, {s['memory_steps']}-step denoise per evaluation-queue depth (0: unbounded; s, median; "
                  "peak GiB above what was held):", "", "| depth | seconds | peak GiB |", "|---|---|---|"]
        lines += [f"| {depth} | {f(r['seconds'], 3)} | {f(r['peak_gib'])} |" for depth, r in depths.items()]
        lines.append("")
    ab = section.get("ours", {}).get("clear_cache_ab")
    if ab:
        lines += ["Ours, whole images (s, medians): MLX's buffer cache kept from the previous image vs released "
                  "before each:", "",
                  "| variant | total | encode | denoise | decode |", "|---|---|---|---|---|"]
        lines += [f"| {variant} | {f(t.get('total'), 3)} | {f(t.get('encode'), 3)} | {f(t.get('denoise'), 3)} | "
                  f"{f(t.get('decode'), 3)} |" for variant, t in ab.items()]
        lines.append("")
    if memory:
        lines += [f"Peak memory per phase, GiB above what was already held ({s['memory_steps']}-step denoise):", "",
                  "| side | weights held | text encode | denoise | VAE decode |", "|---|---|---|---|---|", *memory, ""]
    return lines
