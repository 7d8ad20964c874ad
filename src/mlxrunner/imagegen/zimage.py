"""Z-Image and Z-Image-Turbo (diffusers' ZImagePipeline), numerically as diffusers 0.42.1 runs it.

Python reads the configs, tokenizes and picks defaults; the networks and the loop are C++:
Qwen3 text encoder (`_core.Decoder.hidden_states`), the S3-DiT and the Euler loop
(`_core.ZImageTransformer`, `_core.zimage_denoise`) and the VAE (`_core.VaeDecoder`).
The steps every image model shares are ImagePipeline.run's (imagegen/pipeline.py); this file
holds what is Z-Image's own. Spec: docs/models/zimage.md.

What the request fields mean here:
- width/height: default 1024; rounded down to a multiple of 16 (8x VAE x 2x2 patches).
- steps: the number of transformer evaluations (diffusers' num_inference_steps). Default 9 for
  Turbo, 50 for the base model.
- guidance: diffusers' guidance_scale; classifier-free guidance runs when it is > 0, as
  pred = pos + guidance * (pos - neg) (so 0 is off and g is a "CFG scale" of g + 1). Base model
  default 5.0. Turbo is guidance-distilled: guidance and negative_prompt have no effect and are
  reported as ignored.
- negative_prompt: the CFG negative; default "" (as diffusers) when guidance is on.
- images: Z-Image does not edit; reported as ignored.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from mlxrunner import _core
from mlxrunner.errors import ModelError
from mlxrunner.imagegen.pipeline import (
    Conditioning,
    ImagePipeline,
    ImageRequest,
    Progress,
    read_schedule,
)
from mlxrunner.imagegen.vae import Vae


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


class ZImagePipeline(ImagePipeline):
    architecture = "ZImagePipeline"
    # The chat template for one user message with add_generation_prompt=True, enable_thinking=True
    # (what the pipeline asks for): no system turn, no think block.
    prompt_template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    distilled_defaults = {"steps": 9, "guidance": 0.0}  # Turbo
    base_defaults = {"steps": 50, "guidance": 5.0}  # diffusers' __call__ defaults
    cfg_guidance_above = 0.0  # so 0 is off, and guidance g is a "CFG scale" of g + 1
    # hidden_states[-2]: the output of the second-to-last layer (before the last layer and the final norm).
    text_hidden_states = (-2,)

    def __init__(self, source, progress: Callable[[float], None] | None = None, release_text_encoder: bool = False,
                 denoise_queue_depth: int | None = None, low_memory: bool = False):
        progress = progress or (lambda p: None)
        super().__init__(source, release_text_encoder, low_memory, denoise_queue_depth)
        progress(0.3)
        config = transformer_config(source.read_json("transformer/config.json"), source.location)
        if config.cap_feat_dim != self.text_encoder.hidden_size:
            raise ModelError(f"{source.location}: transformer cap_feat_dim {config.cap_feat_dim} does not match the "
                             f"text encoder's hidden size {self.text_encoder.hidden_size}")
        self.transformer = self.load_transformer(_core.ZImageTransformer, config)
        progress(0.8)
        self.vae = Vae(source)
        # The noise is in the VAE's latent space: [1, in_channels, H / 8, W / 8].
        self.latent_channels, self.latent_scale = config.in_channels, self.vae.decoder.scale_factor
        self.schedule = read_schedule(source)
        self.read_transformer(progress, 0.8, 1.0)
        progress(1.0)

    def is_distilled(self, index: dict) -> bool:
        """Turbo or base? model_index.json's is_distilled when present (as FLUX.2 Klein writes it),
        else the model's name: the released folders and Ollama names say "turbo"."""
        if isinstance(index.get("is_distilled"), bool):
            return index["is_distilled"]
        return "turbo" in f"{self.source.name} {self.source.location}".lower()

    def embed_ids(self, ids: list[int]) -> mx.array:
        """[L, hidden]: the text encoder's hidden_states[-2]."""
        return self.text_encoder.hidden_states(ids)[0]

    def dynamic_shift_mu(self, image_tokens: int, steps: int) -> float:
        return calculate_shift(image_tokens)

    def denoise(self, latents: mx.array, conditioning: Conditioning, request: ImageRequest,
                progress: Progress | None, check_cancelled: Callable[[], None] | None = None,
                cache: _core.StepCache | None = None) -> mx.array | None:
        sigmas = self.sigmas(request.steps, request.width, request.height)
        return _core.zimage_denoise(self.transformer, latents, sigmas, conditioning.prompt, conditioning.negative,
                                    request.guidance, progress, self.denoise_queue_depth, check_cancelled, cache)

    def decoder_input(self, latents: mx.array, width: int, height: int) -> mx.array:
        """The loop's latents are the decoder's input as they are."""
        return latents
