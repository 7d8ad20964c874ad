"""What every image pipeline shares: request defaults and bounds, seeds and noise, the result type.

A pipeline turns (prompt, size, steps, seed, ...) into an image. `generate()` is the public
Python API (returns a PIL image); `run()` returns the image with what the runner reports about
it (seed used, timings, fields that had no effect).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxrunner import _core

# progress(step, total): called before each step i = 0..total-1 and once more with total when the
# loop is done. Returning False cancels; an exception it raises propagates out of generate().
Progress = Callable[[int, int], "bool | None"]

DEFAULT_MAX_PIXELS = 2048 * 2048
# How many transformer blocks the denoising loops queue on the device at most (0: no bound); the
# reasoning for the default is at kDefaultEvalQueueDepth in csrc/nn/eval_queue.h.
DEFAULT_DENOISE_QUEUE_DEPTH = _core.DEFAULT_DENOISE_QUEUE_DEPTH


class Cancelled(Exception):
    """The progress callback asked to stop; no image was made."""


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    ignored: list[str] = field(default_factory=list)  # request fields that had no effect on this model
    prompt_truncated: bool = False
    latents: np.ndarray | None = None  # the final (denoised) latents, float32, diffusers' layout

    def png_text(self, prompt: str) -> dict[str, str]:
        """What the PNG's text chunks say about how the image was made."""
        return {"prompt": prompt, "seed": str(self.seed), "steps": str(self.steps),
                "width": str(self.width), "height": str(self.height), "guidance": f"{self.guidance:g}",
                "software": "mlxrunner"}


def resolve_size(width: int | None, height: int | None, multiple: int, default: int,
                 max_pixels: int) -> tuple[int, int]:
    """Requested size -> the size made. Absent or 0 -> `default`; otherwise rounded DOWN to a
    multiple of `multiple` (never above what was asked), at least one multiple. Too many pixels
    is an error rather than a silent shrink."""
    def fit(value: int | None, name: str) -> int:
        if value is None or value == 0:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f'"{name}" must be a positive integer, got {value!r}')
        return max(multiple, value // multiple * multiple)

    w, h = fit(width, "width"), fit(height, "height")
    if w * h > max_pixels:
        raise ValueError(f'"width" x "height" = {w}x{h} is more than the limit of {max_pixels} pixels')
    return w, h


def resolve_seed(seed: int | None) -> int:
    """The seed a run uses: the given one (any int64; 0 is a seed like any other) or a random one."""
    if seed is None:
        return secrets.randbits(63)
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**63:
        raise ValueError(f'"seed" must be a 64-bit integer, got {seed!r}')
    return seed


def initial_noise(seed: int, shape: Sequence[int]) -> mx.array:
    """Standard normal float32 noise from MLX's RNG keyed by the seed (int64 mapped to uint64)."""
    return mx.random.normal(tuple(shape), dtype=mx.float32, key=mx.random.key(seed & (2**64 - 1)))


def check_latents(latents, shape: tuple[int, ...]) -> mx.array:
    array = np.asarray(latents, dtype=np.float32)
    if array.shape != tuple(shape):
        raise ValueError(f'"latents" must have shape {list(shape)} for this size, got {list(array.shape)}')
    if not np.isfinite(array).all():
        raise ValueError('"latents" contains NaN or infinite values')
    return mx.array(array)


def check_steps(steps: int | None, default: int, maximum: int = 1000) -> int:
    if steps is None or steps == 0:
        return default
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= maximum:
        raise ValueError(f'"steps" must be an integer between 1 and {maximum}, got {steps!r}')
    return steps


def refuse_quantized(source, components=("text_encoder", "transformer", "vae")) -> None:
    """Our image networks take dense weights only; say so at load rather than fail on a shape."""
    from mlxrunner.errors import ModelError

    for component in components:
        if source.quantization(component):
            raise ModelError(f"{source.location}: the {component} is quantized; quantized image models are not "
                             "supported yet (use the bf16/fp32 weights)")


def read_schedule(source):
    """scheduler/scheduler_config.json (absent: the scheduler's defaults) -> _core.FlowMatchSchedule."""
    from mlxrunner.errors import ModelError

    path = "scheduler/scheduler_config.json"
    config = source.read_json(path) if source.has_file(path) else {}
    try:
        return _core.FlowMatchSchedule.from_dict(config)
    except ValueError as exc:
        raise ModelError(f"{source.location}: {path}: {exc}") from None


def size_from_latents(latents, width: int | None, height: int | None, scale: int) -> tuple[int | None, int | None]:
    """With neither side given, injected latents [1, C, h, w] say the size: (w * scale, h * scale)."""
    if latents is not None and width is None and height is None:
        shape = np.shape(latents)
        if len(shape) == 4:
            return shape[3] * scale, shape[2] * scale
    return width, height


def ignored_by_distilled(negative_prompt: str | None, guidance: float | None) -> list[str]:
    """The CFG fields a guidance-distilled model has no use for, as the request gave them."""
    return [name for name, value in (("negative_prompt", negative_prompt), ("guidance", guidance)) if value is not None]


def phase_timings(started: float, encoded: float, denoised: float, done: float) -> dict[str, float]:
    return {"encode": encoded - started, "denoise": denoised - encoded, "decode": done - denoised,
            "total": done - started}


class ImagePipeline:
    """Base class: subclasses implement run()."""

    architecture = ""
    max_pixels = DEFAULT_MAX_PIXELS

    def run(self, prompt: str, *, width: int | None = None, height: int | None = None, steps: int | None = None,
            seed: int | None = None, negative_prompt: str | None = None, guidance: float | None = None,
            images: Sequence[Image.Image] | None = None, latents=None,
            progress: Progress | None = None) -> GeneratedImage:
        raise NotImplementedError

    def generate(self, prompt: str, **kwargs) -> Image.Image:
        """The image for `prompt` (keyword arguments as run())."""
        return self.run(prompt, **kwargs).image
