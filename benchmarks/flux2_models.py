"""Random-weight FLUX.2 Klein folders for benchmarks, written with diffusers' own save_pretrained.

- "small": 2 double + 6 single blocks of width 512, a 27-layer narrow Qwen3 (Klein reads layers
  9, 18 and 27), a half-width Flux2 VAE with 32 latent channels: seconds on a 2-core CPU.
- "klein4b": the real FLUX.2-klein-4B architecture (5 double + 20 single blocks, D 3072, Qwen3-4B,
  the FLUX.2 VAE) in bf16, for the GPU machine.
Both sides of a benchmark load the same folder, so they run the same weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "flux2-klein-tiny"


@dataclass(frozen=True)
class KleinShape:
    name: str
    double: int
    single: int
    heads: int
    head_dim: int
    axes: tuple[int, int, int, int]
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    text_intermediate: int
    vae_channels: tuple[int, ...]
    dtype: str = "float32"


SMALL = KleinShape("small", double=2, single=6, heads=8, head_dim=64, axes=(16, 16, 16, 16), text_hidden=128,
                   text_layers=27, text_heads=4, text_kv_heads=2, text_head_dim=32, text_intermediate=384,
                   vae_channels=(32, 64, 128, 128))
KLEIN_4B = KleinShape("klein4b", double=5, single=20, heads=24, head_dim=128, axes=(32, 32, 32, 32), text_hidden=2560,
                      text_layers=36, text_heads=32, text_kv_heads=8, text_head_dim=128, text_intermediate=9728,
                      vae_channels=(128, 256, 512, 512), dtype="bfloat16")


def initial_latents(width: int, height: int) -> np.ndarray:
    """The benchmarks' injected initial noise: Klein's latents are already 2x2-patchified, 4 x 32
    channels at 1/16 of the size, [1, 128, H/16, W/16] (diffusers' `latents=` layout)."""
    return np.random.default_rng(0).standard_normal((1, 128, height // 16, width // 16)).astype(np.float32)


def build(shape: KleinShape, folder: Path, device: str = "cpu", text_encoder: Path | None = None) -> Path:
    """Write the folder unless it is complete already. Needs torch + diffusers.

    `device` and `text_encoder` as in zimage_models.build (torch's init device; a Qwen3 folder to link)."""
    marker = folder / ".complete"
    if marker.exists():
        return folder
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copytree(FIXTURE / "tokenizer", folder / "tokenizer")
    shutil.copytree(FIXTURE / "scheduler", folder / "scheduler")
    index = json.loads((FIXTURE / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    vocab = json.loads((FIXTURE / "text_encoder" / "config.json").read_text())["vocab_size"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, shape.dtype))  # build in the target dtype
    torch.set_default_device(device)
    try:
        if text_encoder is not None:
            (folder / "text_encoder").symlink_to(Path(text_encoder).resolve(), target_is_directory=True)
        else:
            Qwen3ForCausalLM(Qwen3Config(
                vocab_size=vocab, hidden_size=shape.text_hidden, num_hidden_layers=shape.text_layers,
                num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_kv_heads,
                head_dim=shape.text_head_dim, intermediate_size=shape.text_intermediate, rms_norm_eps=1e-6,
                rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True)).save_pretrained(
                folder / "text_encoder")
        Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=shape.double, num_single_layers=shape.single,
            attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
            joint_attention_dim=3 * shape.text_hidden, timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=shape.axes, rope_theta=2000, eps=1e-6, guidance_embeds=False).save_pretrained(
            folder / "transformer")
        AutoencoderKLFlux2(
            in_channels=3, out_channels=3, block_out_channels=shape.vae_channels, layers_per_block=2,
            latent_channels=32, norm_num_groups=32, sample_size=1024, use_quant_conv=True, use_post_quant_conv=True,
            mid_block_add_attention=True, batch_norm_eps=1e-4, batch_norm_momentum=0.1,
            patch_size=(2, 2)).save_pretrained(folder / "vae")
    finally:
        torch.set_default_dtype(previous)
        torch.set_default_device("cpu")
    if text_encoder is None:
        te_config = json.loads((folder / "text_encoder" / "config.json").read_text())
        te_config.setdefault("rope_theta", 1e6)
        (folder / "text_encoder" / "config.json").write_text(json.dumps(te_config, indent=2))
    marker.write_text("ok")
    return folder
