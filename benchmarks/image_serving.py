"""What an image costs around the denoiser: the first request after start, HTTP and PNG out, memory per phase.

    python -m benchmarks.image_serving FOLDER [--size 1024] [--steps 9] [--rounds 3] [--out results.json]

One function per measurement, shared by the CPU benchmark (benchmarks/cpu/test_image_serving.py, on the small
Z-Image) and by a GPU run on the full-size folders (this module's command line, for the device):
- `serving`: a real runner subprocess. Time to ready (load + warm-up), then `rounds` requests on /completion:
  the client's wall time against the `total_ms` the runner reports for the pipeline itself (encode, denoise,
  decode); the difference is HTTP, PNG encode, base64 and JSON. The first request against the later ones.
- `png_out`: one image through the old way (zlib level 6, base64 as str, json.dumps), Pillow at level 1, and the
  new one (imagegen/png.py: level 1 on several cores,
  base64 bytes spliced into the line), timed on the same pixels.
- `memory`: a fresh process per mode (normal, --low-memory): weights predicted by the memory check, arrays
  alive after load, and MLX's peak per phase of the second image.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "a red fox in fresh snow, golden hour, 35mm photo"
ROOT = Path(__file__).resolve().parents[1]


def serving(folder: Path, size: int, steps: int, rounds: int, extra_args: tuple[str, ...] = ()) -> dict:
    """Time to ready, then per request: wall seconds at the client and the pipeline's own seconds."""
    from mlxrunner.launcher import Runner

    started = time.perf_counter()
    with Runner.start(str(folder), timeout=1200, extra_args=list(extra_args)) as runner:
        ready = time.perf_counter() - started
        walls, pipeline = [], []
        for i in range(rounds):
            begun = time.perf_counter()
            # A prompt of its own each request: every one encodes, so that the first differs from the later ones
            # only by what the first request after start pays (a repeated prompt would reuse its embedding).
            request = {"prompt": f"{PROMPT}, take {i}", "width": size, "height": size, "steps": steps, "seed": 1}
            final = list(runner.complete(request, timeout=1200))[-1]
            walls.append(time.perf_counter() - begun)
            pipeline.append(final["timings"]["total_ms"] / 1000)
            assert base64.b64decode(final["image"])[:8] == b"\x89PNG\r\n\x1a\n"
    later = walls[1:] or walls
    overheads = [w - p for w, p in zip(walls, pipeline)]
    return {"ready_s": ready, "first_s": walls[0], "later_s": statistics.median(later),
            "first_over_later": walls[0] / statistics.median(later), "pipeline_s": statistics.median(pipeline),
            "http_overhead_s": statistics.median(overheads[1:] or overheads), "walls_s": walls}


def png_out(pixels: np.ndarray, rounds: int = 3) -> dict:
    """Seconds and bytes of one image's final line, the old way and the new way, medians of `rounds`."""
    from PIL import Image

    from mlxrunner.http.protocol import ndjson_line
    from mlxrunner.imagegen.images import png_base64

    image = Image.fromarray(pixels, "RGB")

    def old() -> bytes:
        out = io.BytesIO()
        image.save(out, format="PNG")  # Pillow's default level, 6
        text = base64.b64encode(out.getvalue()).decode("ascii")
        return json.dumps({"image": text, "seed": 1, "done": True}, ensure_ascii=False,
                          separators=(",", ":")).encode() + b"\n"

    def pillow_level_1() -> bytes:  # the way before imagegen/png.py: one thread, adaptive filters
        out = io.BytesIO()
        image.save(out, format="PNG", compress_level=1)
        return ndjson_line({"image": base64.b64encode(out.getvalue()), "seed": 1, "done": True})

    def new() -> bytes:
        return ndjson_line({"image": png_base64(image), "seed": 1, "done": True})

    result = {}
    for name, fn in (("old", old), ("pillow_level_1", pillow_level_1), ("new", new)):
        seconds = []
        for _ in range(rounds):
            begun = time.perf_counter()
            line = fn()
            seconds.append(time.perf_counter() - begun)
        result[name] = {"s": statistics.median(seconds), "bytes": len(line)}
    result["old_over_new"] = result["old"]["s"] / result["new"]["s"]
    return result


def memory(folder: Path, size: int, steps: int, low_memory: bool) -> dict:
    """Run `measure_memory` in a fresh process (so neither mode sees the other's arrays)."""
    args = [sys.executable, "-m", "benchmarks.image_serving", str(folder), "--size", str(size), "--steps", str(steps),
            "--measure-memory"] + (["--low-memory"] if low_memory else [])
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(folder: Path, size: int, steps: int, low_memory: bool, queue_depth: int | None = None) -> dict:
    from mlxrunner import loader  # first, before mlx.core: the BLAS shim  # noqa: I001
    import mlx.core as mx
    from mlxrunner.detect import detect
    from mlxrunner.imagegen import load_pipeline
    from mlxrunner.store import resolve

    source = resolve(str(folder))
    detected = detect(source)
    predicted = loader.predicted_weight_bytes(source, detected, low_memory)
    predicted_peak = loader.predicted_peak_bytes(source, detected, low_memory, size)
    depth = {} if queue_depth is None else {"denoise_queue_depth": queue_depth}
    pipe = load_pipeline(str(folder), low_memory=low_memory, **depth)
    loaded = mx.get_active_memory()
    # Two prompts: the second image encodes too (its phases are the ones reported).
    runs = [pipe.run(f"{PROMPT}, take {i}", width=size, height=size, steps=steps, seed=1) for i in range(2)]
    peaks = runs[1].peak_memory
    return {"low_memory": low_memory, "queue_depth": queue_depth, "predicted_weights_bytes": predicted,
            "predicted_peak_bytes": predicted_peak,
            "active_after_load_bytes": loaded,
            "peak_bytes": peaks, "max_peak_bytes": max(peaks.values()), "seconds": runs[1].timings["total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--measure-memory", action="store_true", help="one mode's peaks per phase, in this process")
    parser.add_argument("--queue-depth", type=int, help="with --measure-memory: the denoiser's queue depth")
    args = parser.parse_args()
    if args.measure_memory:
        print(json.dumps(measure_memory(args.folder, args.size, args.steps, args.low_memory, args.queue_depth)))
        return
    result = {"serving": serving(args.folder, args.size, args.steps, args.rounds),
              "memory": [memory(args.folder, args.size, args.steps, low) for low in (False, True)]}
    from mlxrunner.imagegen import load_pipeline

    pipe = load_pipeline(str(args.folder))
    pixels = np.asarray(pipe.generate(PROMPT, width=args.size, height=args.size, steps=args.steps))
    result["png_out"] = png_out(pixels)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
