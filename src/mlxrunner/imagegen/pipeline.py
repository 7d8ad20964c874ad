"""What every image pipeline shares: request bounds and defaults, seeds and noise, the result type,
and `ImagePipeline.run`, the one generation skeleton that each model fills in through a few hooks.

A pipeline turns (prompt, size, steps, seed, ...) into an image. `generate()` is the public
Python API (returns a PIL image); `run()` returns the image with what the runner reports about
it (seed used, timings, fields that had no effect).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxrunner import _core, backend
from mlxrunner.errors import Cancelled, ModelError, RequestError
from mlxrunner.imagegen.images import to_pil
from mlxrunner.imagegen.prompt_embeddings import PromptEmbeddings
from mlxrunner.imagegen.text_encoder import Qwen3TextEncoder
from mlxrunner.imagegen.vae import decode_working_bytes, request_tile
from mlxrunner.llm.model import core_quantization
from mlxrunner.request import Limits

log = logging.getLogger(__name__)

# progress(step, total): called before each step i = 0..total-1 and once more with total when the
# loop is done. Returning False cancels; an exception it raises propagates out of generate().
Progress = Callable[[int, int], "bool | None"]

# --- request bounds: the one place imagegen keeps them ------------------------------------------
# (the HTTP protocol's Limits: the Python API and the server take the same requests)
MAX_STEPS = Limits.max_steps
DEFAULT_MAX_PIXELS = Limits.max_output_pixels
MIN_REFERENCE_SIDE = Limits.min_image_side  # a reference image's shortest side, in pixels
MAX_CACHE_THRESHOLD = Limits.max_cache_threshold
# How many transformer blocks the denoising loops queue on the device at most (0: no bound); the
# reasoning for the default is at kDefaultEvalQueueDepth in csrc/nn/eval_queue.h.
DEFAULT_DENOISE_QUEUE_DEPTH = _core.DEFAULT_DENOISE_QUEUE_DEPTH
# Under --low-memory one block: on an H200 Z-Image-Turbo's 1024² denoise peaked 12.77 GiB at depth 1 against 13.43 at
# 2 (the transformer's 11.5 GiB of weights alone resident), 2 % slower a low-memory image (benchmarks/README.md).
LOW_MEMORY_DENOISE_QUEUE_DEPTH = 1


def denoise_queue_depth_for(requested: int | None, low_memory: bool) -> int:
    """The queue depth asked for, else the mode's default."""
    if requested is not None:
        return requested
    return LOW_MEMORY_DENOISE_QUEUE_DEPTH if low_memory else DEFAULT_DENOISE_QUEUE_DEPTH


# Both models' transformers see the image as tokens of 16 x 16 pixels (8x VAE x 2x2 patches):
# sizes round down to multiples of it.
SIZE_MULTIPLE = 16
DEFAULT_SIZE = 1024  # each side, when the request gives none
# The warm-up image's side on the CPU, where nothing is compiled per shape: the smallest a model takes.
WARM_UP_CPU_SIZE = 4 * SIZE_MULTIPLE


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
    peak_memory: dict[str, int] = field(default_factory=dict)  # bytes MLX's arrays held at most, per phase
    step_cache: StepCacheReport | None = None  # how the step cache did, when the request asked for one

    def png_text(self, prompt: str) -> dict[str, str]:
        """What the PNG's text chunks say about how the image was made."""
        return {"prompt": prompt, "seed": str(self.seed), "steps": str(self.steps),
                "width": str(self.width), "height": str(self.height), "guidance": f"{self.guidance:g}",
                "software": "mlxrunner"}


@dataclass(frozen=True)
class StepCacheReport:
    """The first-block step cache of one run: its threshold and how many transformer evaluations ran in full
    or skipped their remaining blocks (FLUX.2 with CFG counts both calls of a step; Z-Image batches them)."""

    threshold: float
    computed: int
    skipped: int


def step_cache(threshold: float | None) -> _core.StepCache | None:
    """The cache a run uses: none for None or 0 (off, the default), else a StepCache of that threshold."""
    if threshold is None or threshold == 0:
        return None
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not number or not 0 < threshold <= MAX_CACHE_THRESHOLD:
        raise ValueError(f'"cache.threshold" must be a number between 0 and {MAX_CACHE_THRESHOLD:g}, got {threshold!r}')
    return _core.StepCache(float(threshold))


@dataclass
class ImageRequest:
    """A request once its defaults are filled in and every field is checked: what one run makes."""

    width: int
    height: int
    steps: int
    guidance: float
    cfg: bool  # classifier-free guidance runs: the negative prompt is encoded too
    seed: int
    ignored: list[str]  # request fields that have no effect on this model
    references: list  # reference images as the model prepared them (editing); empty for text-to-image
    vae_tile: int | None = None  # the request's "vae_tile", pixels: None decides by size, 0 one pass
    decode_tile: int = 0  # the VAE decode's tile in latents (0: one pass), from vae_tile and the size


@dataclass
class Conditioning:
    """What steers the denoiser."""

    prompt: mx.array  # the prompt's embedding
    negative: mx.array | None  # the negative prompt's, when CFG runs
    references: Any = None  # the reference images, encoded in the model's own form


def resolve_size(width: int | None, height: int | None, multiple: int, default: int,
                 max_pixels: int) -> tuple[int, int]:
    """Requested size -> the size made. Absent or 0 -> `default`; otherwise rounded DOWN to a
    multiple of `multiple` (never above what was asked), at least one multiple. Too many pixels
    is an error rather than a silent shrink: the client's (a RequestError), as a missing side's default
    may be what makes the size too large."""
    def fit(value: int | None, name: str) -> int:
        if value is None or value == 0:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f'"{name}" must be a positive integer, got {value!r}')
        return max(multiple, value // multiple * multiple)

    w, h = fit(width, "width"), fit(height, "height")
    if w * h > max_pixels:
        raise RequestError(f'"width" x "height" = {w}x{h} is more than the limit of {max_pixels} pixels', field="width")
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


def check_steps(steps: int | None, default: int, maximum: int = MAX_STEPS) -> int:
    if steps is None or steps == 0:
        return default
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= maximum:
        raise ValueError(f'"steps" must be an integer between 1 and {maximum}, got {steps!r}')
    return steps


def read_schedule(source):
    """scheduler/scheduler_config.json (absent: the scheduler's defaults) -> _core.FlowMatchSchedule."""
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


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def phase_timings(started: float, encoded: float, denoised: float, done: float) -> dict[str, float]:
    return {"encode": encoded - started, "denoise": denoised - encoded, "decode": done - denoised,
            "total": done - started}


class ImagePipeline(ABC):
    """The generation skeleton every image model shares (`run`); a subclass loads its networks in
    __init__ (after calling this __init__) and implements the hooks at the end of this class.

    What a subclass sets while loading: `transformer`, `vae`, `schedule` (read_schedule),
    `latent_channels` and `latent_scale` (the initial noise is [1, latent_channels,
    H / latent_scale, W / latent_scale]).
    """

    architecture = ""
    max_pixels = DEFAULT_MAX_PIXELS
    max_sequence_length = 512  # templated prompt tokens; the rest is cut off
    # What each model's class sets:
    prompt_template: str  # the chat template the prompt is put in before tokenizing ("{}" for the prompt)
    distilled_defaults: dict  # {"steps": ..., "guidance": ...} of the guidance-distilled models
    base_defaults: dict  # and of the undistilled (base) models
    cfg_guidance_above: float  # an undistilled model runs classifier-free guidance when guidance is above this
    text_hidden_states: tuple[int, ...]  # the text encoder's hidden_states indices the model conditions on

    def __init__(self, source, release_text_encoder: bool = False, low_memory: bool = False,
                 denoise_queue_depth: int | None = None):
        """What loading any model starts with: distilled or not, the Qwen3 text encoder. `low_memory` holds
        the text encoder and the transformer in turn, never both: each request loads the text encoder, encodes,
        frees it, reads the transformer, denoises and frees it before the VAE decodes (the next request reads the
        transformer again from its files, and the text encoder unless its prompts' embeddings are kept:
        `prompt_embeddings`). `denoise_queue_depth`: None takes the mode's default."""
        self.source = source
        self.low_memory = low_memory
        self.denoise_queue_depth = denoise_queue_depth_for(denoise_queue_depth, low_memory)
        self.release_text_encoder = release_text_encoder or low_memory
        self.distilled = self.is_distilled(source.read_json("model_index.json"))
        self.defaults = self.distilled_defaults if self.distilled else self.base_defaults
        self.text_encoder = Qwen3TextEncoder(source, self.text_hidden_states)
        self.prompt_embeddings = PromptEmbeddings()

    def load_transformer(self, network: type, config) -> Any:
        """The `network` (a _core transformer class) built over transformer/'s weights, still unread (lazy);
        packed weights stay packed. The checkpoint's dict is not kept: the network holds what it uses (its
        q/k/v and gate/up projections fused), so once evaluated, the separate checkpoint arrays are freed."""
        self._transformer_recipe = (network, config)
        quantization = core_quantization(self.source.quantization("transformer"))
        weights = backend.compute_weights(self.source.tensors("transformer"))
        try:
            return network(config, weights, quantization)
        except ValueError as exc:
            raise ModelError(f"{self.source.location}: transformer: {exc}") from None

    def read_transformer(self, progress: Callable[[float], None], start: float, end: float) -> None:
        """Read the transformer's weights now rather than during the first request; under low_memory they
        are read when the first denoise needs them, after the text encoder has been freed. Reading a large
        transformer takes seconds, so it goes in about twenty parts of equal bytes, each moving the load
        progress (/health's) from `start` towards `end`."""
        if self.low_memory:
            return
        arrays = self.transformer.weight_arrays()
        total = sum(a.nbytes for a in arrays) or 1
        part, part_bytes, done = [], 0, 0
        for i, array in enumerate(arrays):
            part.append(array)
            part_bytes += array.nbytes
            if part_bytes >= total / 20 or i == len(arrays) - 1:
                mx.eval(part)  # releases the GIL: /health keeps answering
                done += part_bytes
                part, part_bytes = [], 0
                progress(start + (end - start) * done / total)

    def free_transformer(self) -> None:
        """Free the transformer's memory (low_memory, before the VAE decodes). It is built again at once over
        unread (lazy) weights, which the next denoise reads from the files."""
        self.transformer = None
        mx.clear_cache()
        self.transformer = self.load_transformer(*self._transformer_recipe)

    # --- generation --------------------------------------------------------------------------------

    def warm_up(self) -> tuple[int, float]:
        """Make one 1-step image, at the size requests default to on a GPU, so that the first request does not
        pay what MLX does the first time it meets a kernel or a shape: compiling kernels (JIT on CUDA and
        Metal), cuDNN's plans for each convolution and attention shape, the allocator's first buffers. On the
        CPU nothing is compiled per shape and a tiny image is enough. Returns (side, seconds)."""
        side = WARM_UP_CPU_SIZE if mx.default_device() == mx.cpu else DEFAULT_SIZE
        started = time.perf_counter()
        self.run("warm-up", width=side, height=side, steps=1, seed=0)
        return side, time.perf_counter() - started

    def generate(self, prompt: str, **kwargs) -> Image.Image:
        """The image for `prompt` (keyword arguments as run())."""
        return self.run(prompt, **kwargs).image

    def run(self, prompt: str, *, width: int | None = None, height: int | None = None, steps: int | None = None,
            seed: int | None = None, negative_prompt: str | None = None, guidance: float | None = None,
            images: Sequence[Image.Image] | None = None, latents=None,
            progress: Progress | None = None, check_cancelled: Callable[[], None] | None = None,
            cache_threshold: float | None = None, vae_tile: int | None = None) -> GeneratedImage:
        """The image for `prompt` and what the runner reports about it. Every model takes the same
        steps: check the request, make the noise, encode the prompt(s) and any reference images,
        denoise (C++), decode. `check_cancelled()` may raise to stop the denoising loop between transformer
        blocks and the VAE decode between its blocks (`progress` may also stop the loop between steps).
        `cache_threshold` > 0 turns on the first-block step cache (StepCache); None or 0: off. `vae_tile`: the
        VAE's tiles in pixels (decode, and the encode of reference images): None tiles images above 1024² only,
        0 never tiles, n > 0 tiles of n pixels (a multiple of 64) with 25 % overlap, blended. MLX's buffer cache
        is held to the job's working_bytes() while it runs."""
        started = time.perf_counter()
        cache = step_cache(cache_threshold)
        request = self.resolve_request(width, height, steps, seed, negative_prompt, guidance, images, latents,
                                       vae_tile)
        with backend.cache_limit(self.working_bytes(request)):
            return self.run_request(request, prompt, negative_prompt, latents, progress, check_cancelled, cache,
                                    started)

    def run_request(self, request: ImageRequest, prompt: str, negative_prompt: str | None, latents,
                    progress: Progress | None, check_cancelled: Callable[[], None] | None,
                    cache: _core.StepCache | None, started: float) -> GeneratedImage:
        """run() once the request is checked: noise, encode, denoise, decode, each phase timed and its peak
        memory measured."""
        backend.reset_peak_memory()
        noise = self.initial_latents(request, latents)
        conditioning, truncated = self.condition(prompt, negative_prompt, request, check_cancelled)
        encoded, peaks = time.perf_counter(), {"encode": backend.reset_peak_memory()}
        final = self.denoise_in_turn(noise, conditioning, request, progress, check_cancelled, cache)
        if final is None:
            raise Cancelled("cancelled by the progress callback")
        denoised, peaks["denoise"] = time.perf_counter(), backend.reset_peak_memory()
        decoder_latents, pixels = self.decode_pixels(final, request.width, request.height, check_cancelled,
                                                     request.decode_tile)
        done, peaks["decode"] = time.perf_counter(), backend.reset_peak_memory()
        timings = phase_timings(started, encoded, denoised, done)
        log.info("image %dx%d, %d steps: %.2fs (encode %.2f, denoise %.2f, decode %.2f); peak memory GiB: "
                 "encode %s, denoise %s, decode %s", request.width, request.height, request.steps, timings["total"],
                 timings["encode"], timings["denoise"], timings["decode"], *map(gib, peaks.values()))
        return GeneratedImage(
            image=to_pil(pixels), seed=request.seed, width=request.width, height=request.height, steps=request.steps,
            guidance=request.guidance, timings=timings, ignored=request.ignored, prompt_truncated=truncated,
            latents=np.array(decoder_latents), peak_memory=peaks,  # a copy: a view would keep MLX's buffer alive
            step_cache=cache and StepCacheReport(cache.threshold, cache.computed, cache.skipped))

    def working_bytes(self, request: ImageRequest) -> int:
        """What this job's activations may need, to which MLX's buffer cache is held while it runs (a smaller
        job after a larger one does not keep the larger one's buffers): the untiled VAE decode at its size, the
        largest phase (benchmarks/README.md), and an upper bound of the tiled decode's and of the denoiser's."""
        return decode_working_bytes(self.vae.config, request.width, request.height, self.vae.dtype)

    def denoise_in_turn(self, latents: mx.array, conditioning: Conditioning, request: ImageRequest,
                        progress: Progress | None, check_cancelled: Callable[[], None] | None,
                        cache: _core.StepCache | None) -> mx.array | None:
        """denoise(); under low_memory the transformer is freed once the latents are computed, or the loop
        stopped, so that the VAE, and the next request's text encoder, never share memory with it."""
        try:
            final = self.denoise(latents, conditioning, request, progress, check_cancelled, cache)
            if final is not None and self.low_memory:
                mx.eval(final)
            return final
        finally:
            if self.low_memory:
                self.free_transformer()

    def resolve_request(self, width: int | None, height: int | None, steps: int | None, seed: int | None,
                        negative_prompt: str | None, guidance: float | None, images: Sequence[Image.Image] | None,
                        latents, vae_tile: int | None = None) -> ImageRequest:
        """The request's defaults filled in and every field checked, before any work is done."""
        references = self.prepare_references(list(images or []))
        ignored = ["images"] if images and not references else []
        width, height = self.requested_size(width, height, references, latents)
        width, height = resolve_size(width, height, SIZE_MULTIPLE, DEFAULT_SIZE, self.max_pixels)
        steps = check_steps(steps, self.defaults["steps"])
        guidance, cfg, ignored_guidance = self.resolve_guidance(guidance, negative_prompt)
        return ImageRequest(width=width, height=height, steps=steps, guidance=guidance, cfg=cfg,
                            seed=resolve_seed(seed), ignored=ignored + ignored_guidance, references=references,
                            vae_tile=vae_tile, decode_tile=request_tile(vae_tile, width, height))

    def requested_size(self, width: int | None, height: int | None, references: list,
                       latents) -> tuple[int | None, int | None]:
        """The size asked for, before defaults and rounding."""
        return size_from_latents(latents, width, height, self.latent_scale)

    def resolve_guidance(self, guidance: float | None, negative_prompt: str | None) -> tuple[float, bool, list[str]]:
        """(the guidance used, whether classifier-free guidance runs, the fields that have no effect)."""
        if self.distilled:  # guidance is baked into the weights: the CFG fields do nothing
            given = (("negative_prompt", negative_prompt), ("guidance", guidance))
            return self.defaults["guidance"], False, [name for name, value in given if value is not None]
        guidance = self.defaults["guidance"] if guidance is None else float(guidance)
        if not math.isfinite(guidance):
            raise ValueError(f'"guidance" must be a finite number, got {guidance!r}')
        cfg = guidance > self.cfg_guidance_above
        return guidance, cfg, ["negative_prompt"] if negative_prompt is not None and not cfg else []

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The initial noise's shape, which a request's `latents` must have."""
        return (1, self.latent_channels, height // self.latent_scale, width // self.latent_scale)

    def initial_latents(self, request: ImageRequest, latents) -> mx.array:
        """What the loop starts from: the request's `latents` when given (checked), else seeded noise."""
        shape = self.latent_shape(request.width, request.height)
        return check_latents(latents, shape) if latents is not None else initial_noise(request.seed, shape)

    def prompt_ids(self, prompt: str | None) -> tuple[list[int], bool]:
        """The templated prompt's token ids and whether it was cut to max_sequence_length."""
        return self.text_encoder.tokenize(self.prompt_template.format(prompt or ""), self.max_sequence_length)

    def embed_prompt(self, prompt: str | None) -> tuple[mx.array, bool]:
        """The prompt's embedding (evaluated, one prompt: no batch dimension) and whether the prompt was cut; a prompt
        encoded recently takes its kept embedding (imagegen/prompt_embeddings.py) without running the text encoder."""
        ids, truncated = self.prompt_ids(prompt)
        if truncated:
            log.warning("prompt longer than %d tokens (with its template): the rest is cut off",
                        self.max_sequence_length)
        return self.prompt_embeddings.get_or_make(ids, self.embed_ids), truncated

    def encode_prompt(self, prompt: str | None) -> np.ndarray:
        """The prompt's embedding (float32 copy), for parity checks."""
        return np.asarray(self.embed_prompt(prompt)[0].astype(mx.float32))

    def condition(self, prompt: str, negative_prompt: str | None, request: ImageRequest,
                  check_cancelled: Callable[[], None] | None = None) -> tuple[Conditioning, bool]:
        """Encode the prompt (and the negative, with CFG), then any reference images (check_cancelled() runs
        between the VAE encoder's blocks and tiles); and whether the prompt was cut."""
        positive, truncated = self.embed_prompt(prompt)
        negative = self.embed_prompt(negative_prompt or "")[0] if request.cfg else None
        if self.release_text_encoder:  # its memory is free before the VAE encodes the references
            self.text_encoder.release()
        references = (self.encode_references(request.references, request.vae_tile, check_cancelled)
                      if request.references else None)
        return Conditioning(positive, negative, references), truncated

    def sigmas(self, steps: int, width: int, height: int) -> list[float]:
        """The N + 1 sigmas of an N-step run (float32 values, last 0)."""
        base = _core.linspace(1.0, 1.0 / steps, steps)
        mu = self.dynamic_shift_mu((height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE), steps)
        return _core.flow_match_sigmas(base, self.schedule, mu)

    # --- hooks: what each model defines ------------------------------------------------------------

    @abstractmethod
    def is_distilled(self, index: dict) -> bool:
        """Whether the model is guidance-distilled, from model_index.json (and self.source)."""

    @abstractmethod
    def embed_ids(self, ids: list[int]) -> mx.array:
        """The templated prompt's token ids -> its embedding (no batch dimension)."""

    def prepare_references(self, images: list[Image.Image]) -> list:
        """Reference images -> what encode_references takes, checked before any work is done. A
        model that does not edit takes none, and run() reports `images` ignored."""
        return []

    def encode_references(self, references: list, vae_tile: int | None = None,
                          check_cancelled: Callable[[], None] | None = None) -> Any:
        """prepare_references' output -> what denoise() finds in Conditioning.references, the VAE encoding in
        tiles as the request's vae_tile says. Called only when prepare_references returned some: a model that
        edits overrides both."""
        raise NotImplementedError(f"{type(self).__name__} takes no reference images")

    @abstractmethod
    def dynamic_shift_mu(self, image_tokens: int, steps: int) -> float:
        """The scheduler's mu for an image of `image_tokens` tokens (used when it shifts dynamically)."""

    @abstractmethod
    def denoise(self, latents: mx.array, conditioning: Conditioning, request: ImageRequest,
                progress: Progress | None, check_cancelled: Callable[[], None] | None = None,
                cache: _core.StepCache | None = None) -> mx.array | None:
        """The C++ Euler loop from `latents`: the final latents, or None when progress returned False.
        check_cancelled() runs between transformer blocks; `cache` is the run's step cache, if any."""

    @abstractmethod
    def decoder_input(self, latents: mx.array, width: int, height: int) -> mx.array:
        """The loop's final latents -> the VAE decoder's input [1, C, H/8, W/8] (float32)."""

    def decode_float(self, latents: mx.array, width: int, height: int,
                     check_cancelled: Callable[[], None] | None = None, tile: int | None = None
                     ) -> tuple[mx.array, np.ndarray]:
        """The loop's final latents -> (the VAE decoder's input, float32 [H, W, 3] in [0, 1]).
        check_cancelled() is called between the decoder's blocks and may raise to stop it; `tile` is the
        decode's in latents (None: by size, 0: one pass)."""
        z = self.decoder_input(latents, width, height)
        return z, self.vae.decode_float(z, tile=tile, check_cancelled=check_cancelled)

    def decode_pixels(self, latents: mx.array, width: int, height: int,
                      check_cancelled: Callable[[], None] | None = None, tile: int | None = None
                      ) -> tuple[mx.array, np.ndarray]:
        """As decode_float, the image as uint8 [H, W, 3] (Vae.decode: its bytes made on the device)."""
        z = self.decoder_input(latents, width, height)
        return z, self.vae.decode(z, tile=tile, check_cancelled=check_cancelled)
