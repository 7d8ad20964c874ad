"""VAE glue: vae/config.json -> the C++ AutoencoderKL, latents -> 8-bit RGB pixels."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from mlxrunner import _core, backend
from mlxrunner.errors import ModelError, RequestError
from mlxrunner.request import Limits

# Decode in tiles above this many latent pixels (128 x 128 latents = a 1024 x 1024 image):
# past it, the full-size activations and the mid-block's attention over every pixel outgrow
# small machines (2048² would need ~16 GB of attention scores alone).
TILE_ABOVE_LATENT_PIXELS = 128 * 128
# Largest untiled decode allowed: a 2048 x 2048 image (256 x 256 latents) in one pass killed the
# process with SIGFPE inside MLX 0.32.4's CUDA backend (cause inside MLX not traced); 1024 x
# 1024 and anything tiled work. Requests always tile above TILE_ABOVE_LATENT_PIXELS.
UNTILED_LIMIT_LATENT_PIXELS = 2 * 128 * 128
TILE_LATENTS = 128  # diffusers' tile for a sample_size 1024 VAE; 25 % overlap
# What a decode holds beyond the weights, in elements (of the decode's dtype) per output pixel per channel of the
# VAE's second block (block_out_channels[1], the widest one that runs at full resolution), measured with
# mx.get_peak_memory. The decoder runs block by block with its attention in bands (diffusion/vae.cpp). On the CPU
# (float32) 10.0-10.5 bytes, 2.5-2.6 elements, for the tiny VAEs at 128²-1024² and the small bench VAE at 128²-512²
# (36-43 bytes as one graph). On an H200, where each evaluation point waits only for the one before it, 6.5
# elements for Z-Image's VAE in bf16 at 1024² (3.25 GiB) and 7.0 for the tiny test VAE in float32 (897 MiB);
# benchmarks/README.md.
DECODE_ELEMENTS_PER_PIXEL_CHANNEL = {"cpu": 3, "gpu": 8}


def decode_working_bytes(config: _core.VaeConfig, width: int, height: int, dtype: mx.Dtype = mx.float32) -> int:
    """The memory an untiled decode of a width x height image in `dtype` needs beyond the weights (float32, the
    default, bounds every dtype the VAE runs in)."""
    channels = config.block_out_channels
    per = DECODE_ELEMENTS_PER_PIXEL_CHANNEL["cpu" if mx.default_device() == mx.cpu else "gpu"] * dtype.size
    return per * width * height * channels[min(1, len(channels) - 1)]


def decode_dtype(weights: dict) -> mx.Dtype:
    """The dtype a VAE decodes in: its first convolution's, as the backend computes with it (read from the
    header, nothing loaded)."""
    dtype = next((w.dtype for n, w in weights.items() if n.startswith("decoder.conv_in")), mx.float32)
    return mx.float32 if backend.upcasts_on_this_device() and dtype in (mx.bfloat16, mx.float16) else dtype


def auto_tile(latent_height: int, latent_width: int) -> int:
    """The tile (latents a side) a decode or encode of this many latents uses when the request does not say:
    TILE_LATENTS above TILE_ABOVE_LATENT_PIXELS, else 0 (one pass)."""
    return TILE_LATENTS if latent_height * latent_width > TILE_ABOVE_LATENT_PIXELS else 0


def request_tile(vae_tile: int | None, width: int, height: int, scale: int = 8) -> int:
    """A request's "vae_tile" (pixels: None = decide by size, 0 = one pass, n = tiles of n pixels) -> the
    tile in latents for a width x height image, checked before any work is done."""
    latent_height, latent_width = height // scale, width // scale
    if vae_tile is None:
        return auto_tile(latent_height, latent_width)
    multiple = Limits.vae_tile_multiple
    if not isinstance(vae_tile, int) or isinstance(vae_tile, bool) or not 0 <= vae_tile <= Limits.max_vae_tile \
            or vae_tile % multiple:
        raise RequestError(f'"vae_tile" must be 0 or a multiple of {multiple} up to {Limits.max_vae_tile} (pixels), '
                           f"got {vae_tile!r}", field="vae_tile")
    if vae_tile == 0 and latent_height * latent_width > UNTILED_LIMIT_LATENT_PIXELS:
        raise RequestError(f'"vae_tile": 0 (one pass) is refused for {width}x{height}: above '
                           f"{UNTILED_LIMIT_LATENT_PIXELS * scale * scale} pixels MLX's CUDA convolutions fail; "
                           "leave vae_tile out or give a tile size", field="vae_tile")
    return vae_tile // scale


def vae_config(config: dict, location: str) -> _core.VaeConfig:
    try:
        return _core.VaeConfig.from_dict(config)
    except ValueError as exc:
        raise ModelError(f"{location}: vae/config.json: {exc}") from None


def dense_weights(source, component: str) -> dict:
    """The component's tensors with any packed linear dequantized: mflux quantizes the VAE's attention
    linears, which our decoder takes dense. They are a few small matrices, so memory hardly changes;
    they come back in their scales' float dtype (affine), else in the dtype of the VAE's other weights, and
    are computed here, at load, not left as a graph for the first request."""
    tensors, packed = source.tensors(component), source.quantization(component)
    if not packed:
        return tensors
    float_dtype = next((v.dtype for n, v in tensors.items() if n not in packed and mx.issubdtype(v.dtype, mx.floating)),
                       mx.float32)
    out = {name: value for name, value in tensors.items()
           if not (name.endswith(("_scale", "_qbias")) and name.rsplit("_", 1)[0] in packed)}
    for name, params in packed.items():
        scales = tensors[name + "_scale"]
        dtype = scales.dtype if mx.issubdtype(scales.dtype, mx.floating) else float_dtype
        out[name] = mx.dequantize(tensors[name], scales, tensors.get(name + "_qbias"), group_size=params.group_size,
                                  bits=params.bits, mode=params.mode, dtype=dtype)
    mx.eval([out[name] for name in packed])
    return out


def renamed_attention_weights(weights: dict) -> dict:
    """Old checkpoints name the mid-block attention query/key/value/proj_attn; diffusers renames
    them to to_q/to_k/to_v/to_out.0 on load, and so do we."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for name, value in weights.items():
        for old, new in renames.items():
            if "attentions." in name and old in name:
                name = name.replace(old, new)
                break
        out[name] = value
    return out


def to_uint8_on_device(pixels: mx.array) -> np.ndarray:
    """Clamped [0, 1] pixels -> uint8 as diffusers' image processor makes them (x 255 in float32, round half to even,
    cast), done by MLX where `pixels` are (a GPU's memory): MLX's round is rint on every backend, as numpy's is, and
    x 255 is the same float32 product, so the bytes are the same; only they come back to the host."""
    return np.asarray(mx.round(pixels.astype(mx.float32) * mx.array(255.0, mx.float32)).astype(mx.uint8))


class Vae:
    """AutoencoderKL decoder with the latent scale/shift of its config."""

    def __init__(self, source, component: str = "vae"):
        config = source.read_json(f"{component}/config.json")
        self.config = vae_config(config, source.location)
        self.scaling_factor = float(config.get("scaling_factor", 1.0))
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        weights = renamed_attention_weights(backend.compute_weights(dense_weights(source, component)))
        # Kept for subclasses that build more from the same files (FLUX.2's encoder and BatchNorm);
        # the arrays are lazy, so an unused encoder's weights are never read.
        self.config_json, self.weights = config, weights
        try:
            self.decoder = _core.VaeDecoder(self.config, weights)
        except ValueError as exc:
            raise ModelError(f"{source.location}: {component}: {exc}") from None
        self.dtype = decode_dtype(weights)

    def decode(self, latents: mx.array, tile: int | None = None,
               check_cancelled: Callable[[], None] | None = None) -> np.ndarray:
        """Latents [1, C, h, w] (float32, as the denoiser leaves them) -> uint8 [8h, 8w, 3], as diffusers makes its
        image's bytes from output_type="np", done on the device (to_uint8_on_device): a quarter of
        the bytes come back to the host, and the host makes no float passes over the image (~7 ms a 1024² image).

        `tile`: None decides by size (auto_tile), 0 never tiles, n > 0 tiles of n latents.
        """
        return to_uint8_on_device(self._decoded(latents, tile, check_cancelled))

    def decode_float(self, latents: mx.array, tile: int | None = 0,
                     check_cancelled: Callable[[], None] | None = None) -> np.ndarray:
        """Float32 [H, W, 3] in [0, 1], diffusers' output_type="np". check_cancelled() runs between decoder blocks and
        tiles; what it raises stops the decode."""
        return np.asarray(self._decoded(latents, tile, check_cancelled).astype(mx.float32))

    def _decoded(self, latents: mx.array, tile: int | None,
                 check_cancelled: Callable[[], None] | None) -> mx.array:
        """[H, W, 3] in [0, 1] in the VAE's dtype. As diffusers: cast to the VAE dtype first, z / scaling + shift in
        that dtype, map to [0, 1] and clamp in that dtype."""
        dtype = self.dtype
        z = latents.astype(dtype) / mx.array(self.scaling_factor, dtype) + mx.array(self.shift_factor, dtype)
        z = z.transpose(0, 2, 3, 1)
        if tile is None:
            tile = auto_tile(z.shape[1], z.shape[2])
        if tile == 0 and z.shape[1] * z.shape[2] > UNTILED_LIMIT_LATENT_PIXELS:
            raise ValueError(f"an untiled VAE decode of {z.shape[1]} x {z.shape[2]} latents is refused: above "
                             f"{UNTILED_LIMIT_LATENT_PIXELS} latent pixels MLX's CUDA convolutions fail (a 256 x 256 "
                             f"pass killed the process on an H100); decode in tiles (tile=None or tile > 0)")
        image = self.decoder.decode(z, tile, check_cancelled)
        return mx.clip(image * mx.array(0.5, image.dtype) + mx.array(0.5, image.dtype), 0, 1)[0]
