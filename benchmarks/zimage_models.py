"""Random-weight Z-Image folders for benchmarks, written with diffusers' own save_pretrained.

- "small": a quarter-width model (same block structure) that a 2-core CPU runs in seconds.
- "turbo": the real Z-Image-Turbo architecture (6.15B-parameter DiT, Qwen3-4B text encoder,
  FLUX.1 VAE) in bf16: for the GPU machine (benchmarks/README.md); ~20 GB on disk.

Both sides of a benchmark load the same folder, so they run the same weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "zimage-tiny"


@dataclass(frozen=True)
class ZImageShape:
    name: str
    dim: int
    n_heads: int
    n_layers: int
    n_refiner_layers: int
    axes_dims: tuple[int, int, int]
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    text_intermediate: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    dtype: str = "float32"


SMALL = ZImageShape("small", dim=512, n_heads=8, n_layers=6, n_refiner_layers=1, axes_dims=(16, 24, 24),
                    text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_head_dim=64,
                    text_intermediate=768, vae_channels=(32, 64, 128, 128), vae_layers_per_block=2)
TURBO = ZImageShape("turbo", dim=3840, n_heads=30, n_layers=30, n_refiner_layers=2, axes_dims=(32, 48, 48),
                    text_hidden=2560, text_layers=36, text_heads=32, text_kv_heads=8, text_head_dim=128,
                    text_intermediate=9728, vae_channels=(128, 256, 512, 512), vae_layers_per_block=2,
                    dtype="bfloat16")


def initial_latents(width: int, height: int) -> np.ndarray:
    """The benchmarks' injected initial noise, in diffusers' `latents=` layout [1, 16, H/8, W/8]:
    every side of a comparison starts from it."""
    return np.random.default_rng(0).standard_normal((1, 16, height // 8, width // 8)).astype(np.float32)


def build(shape: ZImageShape, folder: Path, device: str = "cpu", text_encoder: Path | None = None) -> Path:
    """Write the folder unless it exists (a marker file says it is complete). Needs torch + diffusers.

    `device`: where torch initialises the weights ("cuda" makes a full-size model in seconds).
    `text_encoder`: an existing Qwen3 folder of the right width to link instead of building one
    (the GPU benchmark shares its Qwen3-4B-shaped LLM folder with both image pipelines)."""
    marker = folder / ".complete"
    if marker.exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    dtype = getattr(torch, shape.dtype)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # The tokenizer (and the pipeline index) of the test fixture: the vocabulary size only sets
    # the embedding table, which is not what is being timed.
    shutil.copytree(FIXTURE / "tokenizer", folder / "tokenizer")
    index = json.loads((FIXTURE / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": shape.name == "turbo"}))
    vocab = json.loads((FIXTURE / "text_encoder" / "config.json").read_text())["vocab_size"]

    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: the full-size model would not fit twice
    torch.set_default_device(device)
    try:
        if text_encoder is not None:
            (folder / "text_encoder").symlink_to(Path(text_encoder).resolve(), target_is_directory=True)
        else:
            text = Qwen3ForCausalLM(Qwen3Config(
                vocab_size=vocab, hidden_size=shape.text_hidden, num_hidden_layers=shape.text_layers,
                num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_kv_heads,
                head_dim=shape.text_head_dim, intermediate_size=shape.text_intermediate, rms_norm_eps=1e-6,
                rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True)).to(dtype)
            text.save_pretrained(folder / "text_encoder")
            del text
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=shape.dim, n_layers=shape.n_layers,
            n_refiner_layers=shape.n_refiner_layers, n_heads=shape.n_heads, n_kv_heads=shape.n_heads, norm_eps=1e-5,
            qk_norm=True, cap_feat_dim=shape.text_hidden, rope_theta=256.0, t_scale=1000.0,
            axes_dims=list(shape.axes_dims), axes_lens=[1536, 512, 512]).to(dtype)
        with torch.no_grad():  # nonzero pad tokens, as a trained model has
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        transformer.save_pretrained(folder / "transformer")
        del transformer
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=shape.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels), layers_per_block=shape.vae_layers_per_block,
            norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=True).to(dtype)
        vae.save_pretrained(folder / "vae")
        del vae
    finally:
        torch.set_default_dtype(previous_dtype)
        torch.set_default_device("cpu")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).save_pretrained(
        folder / "scheduler")
    marker.write_text("ok")
    return folder
