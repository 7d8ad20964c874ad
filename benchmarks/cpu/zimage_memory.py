"""Peak memory of one image, one side per process: `python -m benchmarks.cpu.zimage_memory SIDE FOLDER W H STEPS`.

Prints JSON: peak resident set size of the process (both sides), and for ours also MLX's own
peak allocation. One process per side, so neither sees the other's allocations.
"""

from __future__ import annotations

import json
import resource
import sys


def main() -> None:
    side, folder, width, height, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    from benchmarks.zimage_models import initial_latents

    latents = initial_latents(width, height)
    if side == "ours":
        import mlx.core as mx

        import mlxrunner  # noqa: F401  (before mlx.core: the BLAS shim)
        from mlxrunner.imagegen import load_pipeline

        pipe = load_pipeline(folder)
        mx.reset_peak_memory()
        pipe.generate("a red fox in the snow", width=width, height=height, steps=steps, guidance=0.0, latents=latents)
        extra = {"mlx_peak_mb": mx.get_peak_memory() / 2**20}
    else:
        import torch
        from diffusers import ZImagePipeline

        torch.set_num_threads(2)
        pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe("a red fox in the snow", width=width, height=height, num_inference_steps=steps, guidance_scale=0.0,
             latents=torch.from_numpy(latents))
        extra = {}
    print(json.dumps({"side": side, "peak_rss_mb": peak_rss_kb() / 1024, **extra}))


def peak_rss_kb() -> int:
    """This process's peak resident set. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across fork + exec, so a child started by a big parent reports the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes there, but no /proc


if __name__ == "__main__":
    main()
