"""Z-Image and Z-Image-Turbo (diffusers' ZImagePipeline), numerically as diffusers 0.42.1 runs it.

Python reads the configs, tokenizes and picks defaults; the networks and the loop are C++:
Qwen3 text encoder (`_core.Decoder.hidden_states`), the S3-DiT and the Euler loop
(`_core.ZImageTransformer`, `_core.zimage_denoise`) and the VAE (`_core.VaeDecoder`).
Spec: shared/docs/specs/zimage.md.

What the request fields mean here:
- width/height: default 1024; rounded down to a multiple of 16 (8x VAE x 2x2 patches).
- steps: the number of transformer evaluations (diffusers' num_inference_steps). Default 9 for
  Turbo, 50 for the base model.
- guidance: diffusers' guidance_scale; classifier-free guidance runs when it is > 0, as
  pred = pos + guidance * (pos - neg) (so 0 is off and g is a "CFG scale" of g + 1). Base model
  default 5.0. Turbo is guidance-distilled: guidance and negative_prompt have no effect and are
  reported as ignored.
- negative_prompt: the CFG negative; default "" (as diffusers) when guidance is on.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlxrunner import _core
from mlxrunner.errors import ModelError
from mlxrunner.imagegen.images import to_pil
from mlxrunner.imagegen.pipeline import DEFAULT_DENOISE_QUEUE_DEPTH
from mlxrunner.imagegen.pipeline import (Cancelled, GeneratedImage, ImagePipeline, Progress, check_latents,
                                         check_steps, ignored_by_distilled, initial_noise, phase_timings,
                                         read_schedule, refuse_quantized, resolve_seed, resolve_size,
                                         size_from_latents)
from mlxrunner.imagegen.text_encoder import Qwen3TextEncoder
from mlxrunner.imagegen.vae import Vae

log = logging.getLogger(__name__)

# The chat template for one user message with add_generation_prompt=True, enable_thinking=True
# (what the pipeline asks for): no system turn, no think block.
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_SEQUENCE_LENGTH = 512
SIZE_MULTIPLE = 16
DEFAULT_SIZE = 1024
TURBO_DEFAULTS = dict(steps=9, guidance=0.0)
BASE_DEFAULTS = dict(steps=50, guidance=5.0)  # diffusers' __call__ defaults


def transformer_config(config: dict, location: str) -> _core.ZImageConfig:
    """transformer/config.json -> the C++ config. diffusers lists patch sizes per resolution; we run the first."""
    translated = dict(config)
    for listed, single in (("all_patch_size", "patch_size"), ("all_f_patch_size", "f_patch_size")):
        sizes = config.get(listed)
        if sizes is None:
            continue
        if not isinstance(sizes, list) or not sizes:
            raise ModelError(f"{location}: transformer/config.json: {listed}: expected a non-empty list, got {sizes!r}")
        translated[single] = sizes[0]
    try:
        return _core.ZImageConfig.from_dict(translated)
    except ValueError as exc:
        raise ModelError(f"{location}: transformer/config.json: {exc}") from None


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """diffusers' calculate_shift: mu, linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def is_distilled(source, index: dict) -> bool:
    """Turbo or base? model_index.json's is_distilled when present (as FLUX.2 Klein writes it),
    else the model's name: the released folders and Ollama names say "turbo"."""
    if isinstance(index.get("is_distilled"), bool):
        return index["is_distilled"]
    return "turbo" in f"{source.name} {source.location}".lower()


class ZImagePipeline(ImagePipeline):
    architecture = "ZImagePipeline"

    def __init__(self, source, progress: Callable[[float], None] | None = None, release_text_encoder: bool = False,
                 denoise_queue_depth: int = DEFAULT_DENOISE_QUEUE_DEPTH):
        progress = progress or (lambda p: None)
        self.source = source
        self.denoise_queue_depth = denoise_queue_depth
        index = source.read_json("model_index.json")
        self.distilled = is_distilled(source, index)
        self.defaults = TURBO_DEFAULTS if self.distilled else BASE_DEFAULTS
        self.release_text_encoder = release_text_encoder
        refuse_quantized(source)

        self.text_encoder = Qwen3TextEncoder(source)
        progress(0.3)
        config = transformer_config(source.read_json("transformer/config.json"), source.location)
        if config.cap_feat_dim != self.text_encoder.hidden_size:
            raise ModelError(f"{source.location}: transformer cap_feat_dim {config.cap_feat_dim} does not match the "
                             f"text encoder's hidden size {self.text_encoder.hidden_size}")
        weights = source.tensors("transformer")
        try:
            self.transformer = _core.ZImageTransformer(config, weights)
        except ValueError as exc:
            raise ModelError(f"{source.location}: transformer: {exc}") from None
        self.latent_channels = config.in_channels
        progress(0.8)
        self.vae = Vae(source)
        self.vae_scale = self.vae.decoder.scale_factor
        self.schedule = read_schedule(source)
        mx.eval(list(weights.values()))  # read the weights now, not during the first request
        progress(1.0)

    # --- pieces, public for parity checks ------------------------------------------------------

    def prompt_ids(self, prompt: str) -> tuple[list[int], bool]:
        return self.text_encoder.tokenize(PROMPT_TEMPLATE.format(prompt), MAX_SEQUENCE_LENGTH)

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """The prompt's embedding [L, hidden] as the transformer receives it (float32 copy)."""
        embedding, _ = self._encode(prompt)
        return np.asarray(embedding.astype(mx.float32))

    def sigmas(self, steps: int, width: int, height: int) -> list[float]:
        """The N + 1 sigmas of an N-step run (float32 values, last 0)."""
        base = _core.linspace(1.0, 1.0 / steps, steps)
        mu = calculate_shift((height // 16) * (width // 16))  # only used if the scheduler shifts dynamically
        return _core.flow_match_sigmas(base, self.schedule, mu)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        return (1, self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    def _encode(self, prompt: str) -> tuple[mx.array, bool]:
        ids, truncated = self.prompt_ids(prompt)
        if truncated:
            log.warning("prompt longer than %d tokens (with its template): the rest is cut off", MAX_SEQUENCE_LENGTH)
        # hidden_states[-2]: the output of the second-to-last layer, before the last layer and the final norm.
        layer = self.text_encoder.num_layers - 1
        return self.text_encoder.hidden_states(ids, [layer])[0], truncated

    # --- generation ------------------------------------------------------------------------------

    def run(self, prompt: str, *, width: int | None = None, height: int | None = None, steps: int | None = None,
            seed: int | None = None, negative_prompt: str | None = None, guidance: float | None = None,
            images: Sequence | None = None, latents=None, progress: Progress | None = None) -> GeneratedImage:
        started = time.perf_counter()
        ignored = ["images"] if images else []
        width, height = size_from_latents(latents, width, height, self.vae_scale)
        width, height = resolve_size(width, height, SIZE_MULTIPLE, DEFAULT_SIZE, self.max_pixels)
        steps = check_steps(steps, self.defaults["steps"])
        if self.distilled:
            ignored += ignored_by_distilled(negative_prompt, guidance)
            guidance = 0.0
        else:
            guidance = self.defaults["guidance"] if guidance is None else float(guidance)
            if guidance <= 0 and negative_prompt is not None:
                ignored.append("negative_prompt")
        seed = resolve_seed(seed)
        shape = self.latent_shape(width, height)
        noise = check_latents(latents, shape) if latents is not None else initial_noise(seed, shape)

        caption, truncated = self._encode(prompt)
        negative = self._encode(negative_prompt or "")[0] if guidance > 0 else None
        mx.eval(caption, *([negative] if negative is not None else []))
        if self.release_text_encoder:
            self.text_encoder.release()
        encoded = time.perf_counter()

        final = _core.zimage_denoise(self.transformer, noise, self.sigmas(steps, width, height), caption,
                                     negative, guidance, progress, self.denoise_queue_depth)
        if final is None:
            raise Cancelled("cancelled by the progress callback")
        denoised = time.perf_counter()
        pixels = self.vae.decode(final)
        done = time.perf_counter()
        return GeneratedImage(
            image=to_pil(pixels), seed=seed, width=width, height=height, steps=steps, guidance=guidance,
            timings=phase_timings(started, encoded, denoised, done),
            ignored=ignored, prompt_truncated=truncated, latents=np.asarray(final))
