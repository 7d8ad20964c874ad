"""FLUX.2 Klein (diffusers' Flux2KleinPipeline): text-to-image and multi-reference editing,
numerically as diffusers 0.42.1 runs it.

Python reads the configs, tokenizes, prepares reference images and applies the VAE's BatchNorm;
the networks, the loop and the latent layouts are C++: the Qwen3 text encoder
(`_core.Decoder.hidden_states`), the MM-DiT and the Euler loop (`_core.Flux2Transformer`,
`_core.flux2_denoise`), pack / patchify (`_core.flux2_pack`, ...) and the VAE (`_core.VaeEncoder` /
`_core.VaeDecoder`).
The steps every image model shares are ImagePipeline.run's (imagegen/pipeline.py); this file
holds what is FLUX.2 Klein's own. Spec: docs/models/flux2_klein.md.

What the request fields mean here:
- width/height: rounded down to a multiple of 16 (8x VAE x 2x2 patches). Default: the first
  reference image's size after its crop (each side on its own, as diffusers), else 1024.
- steps: transformer evaluations per image (diffusers' num_inference_steps). Default 4 for the
  distilled Klein models, 50 for the base models.
- guidance: diffusers' guidance_scale. The base (undistilled) models run true classifier-free
  guidance when it is > 1, as v = v_neg + guidance * (v_pos - v_neg) (two transformer calls per
  step); default 4.0. Distilled models ignore it (and negative_prompt) and report them ignored.
- negative_prompt: the CFG negative text, default "" (diffusers 0.42.1 only takes it as
  negative_prompt_embeds; we encode the text the same way as the prompt).
- images: reference images for editing. diffusers' preprocessing: refused below 64 px a side or
  beyond 8:1; above 1024² pixels resized (LANCZOS) to about 1024²; centre-cropped to multiples of
  16; each encoded on its own (posterior mode). Divergence: alpha is composited on white (as the
  runner's request decoding does) where diffusers drops it with convert("RGB").
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxrunner import _core
from mlxrunner.errors import ModelError
from mlxrunner.imagegen.images import BadImage, check_dimensions, to_rgb
from mlxrunner.imagegen.pipeline import (
    MIN_REFERENCE_SIDE,
    SIZE_MULTIPLE,
    Conditioning,
    ImagePipeline,
    ImageRequest,
    Progress,
    read_schedule,
)
from mlxrunner.imagegen.vae import Vae, auto_tile, decode_working_bytes, request_tile

TEXT_LAYERS = [9, 18, 27]  # diffusers' text_encoder_out_layers: hidden_states indices, concatenated
REFERENCE_POSITION_SCALE = 10  # reference image k sits at T = 10 (k + 1)
REFERENCE_MAX_AREA = 1024 * 1024


def transformer_config(config: dict, location: str) -> _core.Flux2Config:
    try:
        return _core.Flux2Config.from_dict(config)
    except ValueError as exc:
        raise ModelError(f"{location}: transformer/config.json: {exc}") from None


# --- latent layouts and token positions (diffusers' Flux2 pipeline helpers, in C++) ------------


def patchify(z: mx.array) -> mx.array:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channel c * 4 + dy * 2 + dx."""
    return _core.flux2_patchify(z)


def unpatchify(z: mx.array) -> mx.array:
    return _core.flux2_unpatchify(z)


def pack(z: mx.array) -> mx.array:
    """[B, C, h, w] -> tokens [B, h * w, C], row-major."""
    return _core.flux2_pack(z)


def unpack(tokens: mx.array, h: int, w: int) -> mx.array:
    """pack's inverse (diffusers scatters by ids; for the ids we make that is this reshape)."""
    return _core.flux2_unpack(tokens, h, w)


def position_ids(h: int, w: int, t: int = 0) -> np.ndarray:
    """(t, y, x, 0) for every token of an h x w grid, row-major: int32 [h * w, 4]."""
    return np.asarray(_core.flux2_image_ids(h, w, t))


# diffusers' pixel values (VaeImageProcessor): a byte / 255 in float32, then 2 p - 1; one per byte value. The
# encoder's input is gathered from this table on the device: the same floats, bit for bit, on any backend, while 3
# bytes a pixel cross to the device instead of 12 and the host makes no float passes over a megapixel (~7 ms on
# a 1024² reference, 1 % of an edit on an H100).
PIXEL_VALUES = np.float32(2.0) * (np.arange(256, dtype=np.float32) / np.float32(255.0)) - np.float32(1.0)


def reference_crop(image, name: str = "images[0]") -> np.ndarray:
    """A reference image -> its pixels as diffusers crops them: uint8 [h', w', 3], h' and w' the (LANCZOS-shrunk if
    above 1024² pixels) size floored to multiples of 16, centre-cropped; alpha composited on white."""
    if not isinstance(image, Image.Image):
        raise BadImage(f'"{name}" must be a PIL image, got {type(image).__name__}')
    width, height = image.size
    check_dimensions(name, width, height, MIN_REFERENCE_SIDE)
    image = to_rgb(image)
    if width * height > REFERENCE_MAX_AREA:
        scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size
    cropped_w, cropped_h = width // SIZE_MULTIPLE * SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE
    left, top = (width - cropped_w) // 2, (height - cropped_h) // 2
    return np.asarray(image.crop((left, top, left + cropped_w, top + cropped_h)))


def encoder_input(crop: np.ndarray) -> mx.array:
    """reference_crop's pixels -> the VAE encoder's input: float32 [1, h, w, 3] in [-1, 1] (channels last)."""
    if mx.default_device() == mx.cpu:  # numpy's gather: MLX's CPU take is ~7x slower (22 against 3 ms a megapixel)
        return mx.array(np.take(PIXEL_VALUES, crop))[None]
    return mx.take(mx.array(PIXEL_VALUES), mx.array(crop))[None]


class Flux2Vae(Vae):
    """AutoencoderKLFlux2: the AutoencoderKL decoder and encoder plus the BatchNorm statistics that
    (de)normalise the 2x2-patchified latents."""

    def __init__(self, source, component: str = "vae"):
        super().__init__(source, component)
        config, weights = self.config_json, self.weights
        if list(config.get("patch_size", [2, 2])) != [2, 2]:
            raise ModelError(f"{source.location}: {component}/config.json: only patch_size [2, 2] is supported")
        eps = float(config.get("batch_norm_eps", 1e-4))
        channels = 4 * self.config.latent_channels
        stats = []
        for name in ("bn.running_mean", "bn.running_var"):
            value = weights.get(name)
            if value is None or tuple(value.shape) != (channels,):
                raise ModelError(f"{source.location}: {component}: {name} must be a [{channels}] tensor")
            stats.append(value)
        # As diffusers: sqrt(var + eps) in the weights' dtype, then the latents' dtype (float32 here).
        self.bn_mean = stats[0].reshape(1, -1, 1, 1).astype(mx.float32)
        self.bn_std = mx.sqrt(stats[1] + mx.array(eps, stats[1].dtype)).reshape(1, -1, 1, 1).astype(mx.float32)
        try:
            self.encoder = _core.VaeEncoder(self.config, weights)
        except ValueError as exc:
            raise ModelError(f"{source.location}: {component}: {exc}") from None

    def denormalize(self, tokens: mx.array, h: int, w: int) -> mx.array:
        """Packed model latents [1, h * w, 4C] -> the decoder's input [1, C, 2h, 2w] (float32)."""
        return unpatchify(unpack(tokens.astype(mx.float32), h, w) * self.bn_std + self.bn_mean)

    def encode_tokens(self, pixels: mx.array, tile: int | None = None,
                      check_cancelled: Callable[[], None] | None = None) -> mx.array:
        """Encoder input [1, H, W, 3] in [-1, 1] (encoder_input's) -> packed, BN-normalised tokens [1, HW/256, 4C]
        (float32). `tile` (latents a side, as decode's): None decides by size (auto_tile), 0 is one pass, n > 0
        encodes tiles of 8n pixels. check_cancelled() runs between the encoder's blocks and tiles."""
        x = pixels.astype(self.dtype)
        scale = self.encoder.scale_factor
        if tile is None:
            tile = auto_tile(x.shape[1] // scale, x.shape[2] // scale)
        mean = self.encoder.encode(x, tile * scale, check_cancelled).astype(mx.float32).transpose(0, 3, 1, 2)
        return pack((patchify(mean) - self.bn_mean) / self.bn_std)


class Flux2KleinPipeline(ImagePipeline):
    architecture = "Flux2KleinPipeline"
    # Qwen3's chat template for one user message, add_generation_prompt=True, enable_thinking=False:
    # an empty think block closes the assistant's prefix.
    prompt_template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    distilled_defaults = {"steps": 4, "guidance": 1.0}
    base_defaults = {"steps": 50, "guidance": 4.0}  # diffusers' __call__ defaults
    cfg_guidance_above = 1.0  # diffusers' do_classifier_free_guidance
    text_hidden_states = tuple(TEXT_LAYERS)
    latent_scale = SIZE_MULTIPLE  # the noise is patchified: one latent pixel per transformer token

    def __init__(self, source, progress: Callable[[float], None] | None = None, release_text_encoder: bool = False,
                 denoise_queue_depth: int | None = None, low_memory: bool = False):
        progress = progress or (lambda p: None)
        super().__init__(source, release_text_encoder, low_memory, denoise_queue_depth)
        self.pad_id = self._pad_id()
        progress(0.3)
        config = transformer_config(source.read_json("transformer/config.json"), source.location)
        if config.joint_attention_dim != len(TEXT_LAYERS) * self.text_encoder.hidden_size:
            raise ModelError(f"{source.location}: transformer joint_attention_dim {config.joint_attention_dim} is not "
                             f"{len(TEXT_LAYERS)} x the text encoder's hidden size {self.text_encoder.hidden_size}")
        self.transformer = self.load_transformer(_core.Flux2Transformer, config)
        self.latent_channels = config.in_channels
        progress(0.8)
        self.vae = Flux2Vae(source)
        if 4 * self.vae.config.latent_channels != self.latent_channels:
            raise ModelError(f"{source.location}: transformer in_channels {self.latent_channels} is not 4 x the VAE's "
                             f"latent_channels {self.vae.config.latent_channels}")
        if self.vae.decoder.scale_factor * 2 != SIZE_MULTIPLE:
            raise ModelError(f"{source.location}: the VAE must downsample 8x (4 block_out_channels)")
        self.schedule = read_schedule(source)
        self.read_transformer(progress, 0.8, 1.0)
        progress(1.0)

    def _pad_id(self) -> int:
        pad = "<|endoftext|>"
        if self.source.has_file("tokenizer/tokenizer_config.json"):
            configured = self.source.read_json("tokenizer/tokenizer_config.json").get("pad_token")
            if isinstance(configured, dict):
                configured = configured.get("content")
            pad = configured or pad
        pad_id = self.text_encoder.token_id(pad)
        if pad_id is None:
            raise ModelError(f"{self.source.location}: the tokenizer has no pad token {pad!r}")
        return pad_id

    def is_distilled(self, index: dict) -> bool:
        """diffusers' pipeline argument; absent means False (the base models run CFG)."""
        return bool(index.get("is_distilled", False))

    def embed_ids(self, ids: list[int]) -> mx.array:
        """[512, 3 x hidden]: the ids right-padded to 512, hidden states TEXT_LAYERS concatenated."""
        states = self.text_encoder.padded_hidden_states(ids, self.max_sequence_length, self.pad_id)
        return mx.concatenate(states, axis=-1)

    def dynamic_shift_mu(self, image_tokens: int, steps: int) -> float:
        """diffusers' compute_empirical_mu, from the noise tokens only (not the references')."""
        return _core.flux2_empirical_mu(image_tokens, steps)

    # --- reference images (editing) ------------------------------------------------------------

    def requested_size(self, width: int | None, height: int | None, references: list,
                       latents) -> tuple[int | None, int | None]:
        if references:  # diffusers: each missing side from the first reference (after its crop)
            return width or references[0].shape[1], height or references[0].shape[0]
        return super().requested_size(width, height, references, latents)

    def prepare_references(self, images: list) -> list[np.ndarray]:
        return [reference_crop(image, f"images[{k}]") for k, image in enumerate(images)]

    def encode_references(self, references: list[np.ndarray], vae_tile: int | None = None,
                          check_cancelled: Callable[[], None] | None = None) -> tuple[mx.array, mx.array]:
        tokens, ids = self.reference_tokens(references, vae_tile, check_cancelled)
        mx.eval(tokens)
        return tokens, mx.array(ids)

    def encode_images(self, images: list) -> tuple[mx.array, np.ndarray]:
        """Reference images -> packed tokens [1, Lr, C] and their ids (10 (k + 1), y, x, 0) [Lr, 4]."""
        return self.reference_tokens(self.prepare_references(images))

    def reference_tokens(self, crops: list[np.ndarray], vae_tile: int | None = None,
                         check_cancelled: Callable[[], None] | None = None) -> tuple[mx.array, np.ndarray]:
        """reference_crop's pixels -> tokens and ids. `vae_tile`: the request's (pixels; None: by size), which the
        encoder's tiles follow."""
        tokens, ids = [], []
        for k, crop in enumerate(crops):  # each image encoded on its own
            height, width = crop.shape[:2]
            tile = request_tile(vae_tile, width, height)
            tokens.append(self.vae.encode_tokens(encoder_input(crop), tile, check_cancelled))
            ids.append(position_ids(height // SIZE_MULTIPLE, width // SIZE_MULTIPLE,
                                    REFERENCE_POSITION_SCALE * (k + 1)))
        return mx.concatenate(tokens, axis=1), np.concatenate(ids)

    def working_bytes(self, request: ImageRequest) -> int:
        """As every model's, or the encode of a reference image larger than the output (the encoder's activations
        are the decoder's at the same size: the same blocks, in the other order)."""
        sides = [(crop.shape[1], crop.shape[0]) for crop in request.references]
        encodes = [decode_working_bytes(self.vae.config, w, h, self.vae.dtype) for w, h in sides]
        return max([super().working_bytes(request)] + encodes)

    # --- the loop and the decoder ----------------------------------------------------------------

    def denoise(self, latents: mx.array, conditioning: Conditioning, request: ImageRequest,
                progress: Progress | None, check_cancelled: Callable[[], None] | None = None,
                cache: _core.StepCache | None = None) -> mx.array | None:
        """Over the noise packed into tokens [1, h * w, C] with their (0, y, x, 0) ids; the prompt
        embeddings get their batch dimension here."""
        _, _, grid_h, grid_w = latents.shape
        negative = conditioning.negative
        references, reference_ids = conditioning.references or (None, None)
        return _core.flux2_denoise(self.transformer, pack(latents), mx.array(position_ids(grid_h, grid_w)),
                                   self.sigmas(request.steps, request.width, request.height),
                                   conditioning.prompt[None], None if negative is None else negative[None],
                                   request.guidance, references, reference_ids, progress,
                                   self.denoise_queue_depth, check_cancelled, cache)

    def decoder_input(self, tokens: mx.array, width: int, height: int) -> mx.array:
        """Final packed latents -> the VAE input [1, C, H/8, W/8]: unpacked, BatchNorm-denormalised, unpatchified."""
        return self.vae.denormalize(tokens, height // SIZE_MULTIPLE, width // SIZE_MULTIPLE)
