#!/usr/bin/env python3
"""Build a TINY random-weight Z-Image diffusers folder and record golden outputs of
diffusers' ZImagePipeline (0.42.1) for parity tests that run WITHOUT torch.

Usage (from the repository root, with the side venv that has torch + diffusers):

    .goldens/bin/python scripts/goldens_zimage.py \
        [--fixture-dir tests/fixtures/zimage-tiny] [--goldens-dir tests/goldens/zimage]

Writes
  <fixture-dir>/                  diffusers pipeline folder (model_index.json, scheduler/, text_encoder/,
                                  tokenizer/, transformer/, vae/), float32 safetensors, loadable with
                                  ZImagePipeline.from_pretrained
  <goldens-dir>/reference.safetensors   numpy arrays, keys "<case>/<name>" (see README.md there)
  <goldens-dir>/reference.json          metadata (versions, configs, prompts, templated text, token ids,
                                        sigmas, timesteps, shapes)

Deterministic: weights come from one seeded torch.Generator, initial latents from numpy's
default_rng, torch runs single-threaded; re-running on the same machine gives byte-identical files.
Nothing touches the network: the tokenizer is a byte-level BPE trained locally with `tokenizers`.
The model this mirrors is described in docs/models/zimage.md; the tokenizer/text-encoder builders follow
the same recipe as scripts/goldens_flux2_klein.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm  # noqa: E402
from golden_tokenizer import build_qwen_tokenizer  # noqa: E402  (scripts/, beside this file)
from safetensors.numpy import save_file  # noqa: E402
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "zimage-tiny"
DEFAULT_GOLDENS_DIR = REPO_ROOT / "tests" / "goldens" / "zimage"

WEIGHT_SEED = 0
MAX_SEQ = 512

# ----------------------------------------------------------------------------- configs
TE_CONFIG = dict(  # tiny Qwen3 (real: hidden 2560, 36 layers, 32/8 heads, head_dim 128)
    hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, hidden_act="silu",
)
TRANSFORMER_CONFIG = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=96, n_layers=2, n_refiner_layers=1,
    n_heads=3, n_kv_heads=3, norm_eps=1e-5, qk_norm=True, cap_feat_dim=48, rope_theta=256.0,
    t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512],
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 32, 32, 32], layers_per_block=1,
    act_fn="silu", latent_channels=16, norm_num_groups=8, sample_size=64, scaling_factor=0.3611,
    shift_factor=0.1159, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

# Qwen3-style chat template, reduced to what Z-Image uses. For one user message with
# add_generation_prompt=True, enable_thinking=True it renders exactly
#   "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
# (like Qwen3's own template, the empty think block only appears when enable_thinking is false).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

CORPUS = [
    "a photo of a cat sitting on a red sofa in the living room",
    "a tiny red fox in fresh snow, 3 apples and a wooden table",
    "the quick brown fox jumps over the lazy dog",
    "portrait of an astronaut riding a horse on the moon, highly detailed",
    "user assistant think image of a purple sky over the sea, blurry, low quality",
    "assistant", "user",
] * 8

UNICODE_PROMPT = "a tiny red fox, 3 apples & ünïcödé"
CFG_PROMPT = ("a highly detailed portrait of an astronaut riding a horse on the moon, while the quick "
              "brown fox jumps over the lazy dog in fresh snow under a purple sky, 35mm photo")
CFG_NEGATIVE = "blurry, low quality"
LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog, 3 apples & ünïcödé."] * 40)

# name -> (prompt, negative_prompt, height, width, steps, guidance_scale, dtype, latent seed)
CASES = {
    "t2i_64x96": (UNICODE_PROMPT, None, 64, 96, 4, 0.0, "float32", 1001),
    "t2i_80x48": ("a photo of a cat sitting on a red sofa", None, 80, 48, 3, 0.0, "float32", 1002),
    "t2i_128x128": ("portrait of an astronaut riding a horse on the moon", None, 128, 128, 2, 0.0, "float32", 1003),
    "cfg_64x64": (CFG_PROMPT, CFG_NEGATIVE, 64, 64, 3, 3.0, "float32", 1004),
    "cfg_default_negative_64x64": ("a wooden table with 3 apples", None, 64, 64, 2, 2.0, "float32", 1005),
    "bf16_64x96": (UNICODE_PROMPT, None, 64, 96, 4, 0.0, "bfloat16", 1001),
}
VAE_DECODE_SEED = 2001


# ----------------------------------------------------------------------------- builders
def build_tokenizer() -> Qwen2TokenizerFast:
    return build_qwen_tokenizer(CORPUS, CHAT_TEMPLATE)


def _randn(shape, gen, scale=1.0):
    return scale * torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def perturb_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm weights default to 1 (biases to 0): randomise them, so a swapped/missing norm weight
    shows up in a parity test. Works by module type (catches cap_embedder.0, norm_q/norm_k, ...)."""
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, DiffusersRMSNorm)
    with torch.no_grad():
        for _name, mod in module.named_modules():
            is_norm = isinstance(mod, norm_types) or type(mod).__name__.endswith("RMSNorm")
            if not is_norm:
                continue
            w = getattr(mod, "weight", None)
            b = getattr(mod, "bias", None)
            if isinstance(w, torch.nn.Parameter):
                w.copy_(1.0 + _randn(w.shape, gen, 0.1))
            if isinstance(b, torch.nn.Parameter):
                b.copy_(_randn(b.shape, gen, 0.1))


def build_text_encoder(tok, gen) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        vocab_size=len(tok), bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), **TE_CONFIG,
    )
    te = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # O(1)-scale weights so every layer visibly contributes
        for name, p in te.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(_randn(p.shape, gen))
            elif p.ndim == 2:
                p.copy_(_randn(p.shape, gen) / np.sqrt(p.shape[1]))
    perturb_norms(te, gen)
    te.tie_weights()
    return te


def build_transformer(gen) -> ZImageTransformer2DModel:
    t = ZImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    with torch.no_grad():
        # N(0, 1/fan_in) for every Linear, gain 2 on the adaLN paths so scales/gates are O(1);
        # biases N(0, 0.1^2) (they default to uniform/zero).
        for mname, mod in t.named_modules():
            if isinstance(mod, torch.nn.Linear):
                gain = 2.0 if "adaLN_modulation" in mname else 1.0
                mod.weight.copy_(_randn(mod.weight.shape, gen, gain / np.sqrt(mod.weight.shape[1])))
                if mod.bias is not None:
                    mod.bias.copy_(_randn(mod.bias.shape, gen, 0.1))
        perturb_norms(t, gen)
        t.x_pad_token.copy_(_randn(t.x_pad_token.shape, gen))     # default zeros
        t.cap_pad_token.copy_(_randn(t.cap_pad_token.shape, gen))  # default zeros
    return t


def build_vae(gen) -> AutoencoderKL:
    v = AutoencoderKL(**VAE_CONFIG).eval()
    with torch.no_grad():
        for mname, mod in v.named_modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = int(np.prod(mod.weight.shape[1:]))
                gain = 0.8 if mname.endswith("conv_out") else 1.0
                mod.weight.copy_(_randn(mod.weight.shape, gen, gain / np.sqrt(fan_in)))
                if mod.bias is not None:
                    mod.bias.copy_(_randn(mod.bias.shape, gen, 0.05))
        perturb_norms(v, gen)
    return v


def build_pipeline() -> ZImagePipeline:
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    torch.manual_seed(WEIGHT_SEED)  # module constructors draw default inits from the global RNG
    tok = build_tokenizer()
    te = build_text_encoder(tok, gen)
    tr = build_transformer(gen)
    vae = build_vae(gen)
    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return ZImagePipeline(scheduler=sch, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr)


def save_fixture(pipe: ZImagePipeline, fixture_dir: Path) -> None:
    if fixture_dir.exists():
        shutil.rmtree(fixture_dir)
    pipe.save_pretrained(str(fixture_dir), safe_serialization=True)
    # Tokenizer: keep the chat template inside tokenizer_config.json (as the real checkpoint does)
    # instead of transformers 5's separate chat_template.jinja.
    tok_dir = fixture_dir / "tokenizer"
    shutil.rmtree(tok_dir)
    pipe.tokenizer.save_pretrained(str(tok_dir), save_jinja_files=False)
    tok_cfg_path = tok_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["padding_side"] = "right"  # the default, but say it (ZImagePipeline relies on right padding)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    # text_encoder/config.json: transformers 5 writes rope_parameters.rope_theta only; the real
    # checkpoint (older transformers) has a top-level "rope_theta". Keep both.
    te_cfg_path = fixture_dir / "text_encoder" / "config.json"
    te_cfg = json.loads(te_cfg_path.read_text())
    te_cfg["rope_theta"] = (te_cfg.get("rope_parameters") or {}).get("rope_theta", TE_CONFIG["rope_theta"])
    te_cfg_path.write_text(json.dumps(te_cfg, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- helpers
def t2np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x.long()
        return np.ascontiguousarray(x.numpy())
    return np.ascontiguousarray(np.asarray(x))


def templated(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)


def tokenize_like_pipeline(tok, prompt: str) -> tuple[str, np.ndarray]:
    """Exactly ZImagePipeline._encode_prompt's tokenisation; returns the unpadded ids."""
    text = templated(tok, prompt)
    enc = tok([text], padding="max_length", max_length=MAX_SEQ, truncation=True, return_tensors="pt")
    mask = enc.attention_mask[0].bool()
    return text, enc.input_ids[0][mask].numpy().astype(np.int32)


def latents_for(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16, h // 8, w // 8)).astype(np.float32)


def image_stats(img_u8: np.ndarray) -> dict:
    sat = float(np.mean((img_u8 == 0) | (img_u8 == 255)))
    return {"std": round(float(img_u8.std()), 2), "mean": round(float(img_u8.mean()), 2),
            "saturated_frac": round(sat, 4)}


def check_image(name: str, img_u8: np.ndarray) -> dict:
    st = image_stats(img_u8)
    print(f"  [{name}] image uint8 std={st['std']} mean={st['mean']} saturated={st['saturated_frac']:.3f}")
    assert st["std"] > 20, f"{name}: decoded image is nearly flat ({st})"
    assert st["saturated_frac"] < 0.30, f"{name}: decoded image is saturated ({st})"
    return st


# ----------------------------------------------------------------------------- cases
def run_case(pipe: ZImagePipeline, name: str, spec, store: dict, meta: dict) -> None:
    prompt, negative, height, width, steps, guidance, dtype, seed = spec
    init = latents_for(seed, height, width)
    cap: dict = {"calls": 0, "embeds": []}

    def pre_hook(mod, args, kwargs):
        cap["calls"] += 1
        x, t = args[0], args[1]
        if cap["calls"] <= 2:  # step 0 (required) and step 1 (its t != 0: catches t_scale / 1-sigma slips)
            i = cap["calls"] - 1
            cap[f"step{i}_input"] = t2np(torch.stack(list(x), 0))
            cap[f"step{i}_timestep"] = t2np(t)
        if cap["calls"] == 1:
            cap["step0_dtypes"] = {"input": str(x[0].dtype), "timestep": str(t.dtype),
                                   "cap_feats": [str(c.dtype) for c in args[2]],
                                   "cap_lens": [int(c.shape[0]) for c in args[2]],
                                   "x_is_list": isinstance(x, list), "batch": len(x)}

    def fwd_hook(mod, args, kwargs, out):
        lst = out[0]
        if cap["calls"] <= 2:
            cap[f"step{cap['calls'] - 1}_output"] = t2np(torch.stack(list(lst), 0))
        if cap["calls"] == 1:
            cap["step0_dtypes"]["output"] = str(lst[0].dtype)
            cap["step0_dtypes"]["output_type"] = type(out).__name__ + "[" + type(lst).__name__ + "]"

    orig_encode = pipe.encode_prompt

    def encode_prompt(*a, **k):
        pe, ne = orig_encode(*a, **k)
        cap["embeds"].append((pe, ne))
        return pe, ne

    common = dict(prompt=prompt, negative_prompt=negative, height=height, width=width,
                  num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=MAX_SEQ)
    hooks = [pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
             pipe.transformer.register_forward_hook(fwd_hook, with_kwargs=True)]
    pipe.encode_prompt = encode_prompt
    t0 = time.time()
    try:
        lat = pipe(latents=torch.from_numpy(init.copy()), output_type="latent", **common).images
        sigmas, timesteps = t2np(pipe.scheduler.sigmas), t2np(pipe.scheduler.timesteps)
        n_calls = cap["calls"]
    finally:
        for h in hooks:
            h.remove()
        pipe.encode_prompt = orig_encode
    img_np = pipe(latents=torch.from_numpy(init.copy()), output_type="np", **common).images
    img_pil = pipe(latents=torch.from_numpy(init.copy()), output_type="pil", **common).images[0]
    dt = time.time() - t0

    img_float = np.ascontiguousarray(img_np[0].astype(np.float32))
    img_u8 = np.ascontiguousarray(np.asarray(img_pil.convert("RGB"), dtype=np.uint8))
    assert img_float.shape == (height, width, 3) and img_u8.shape == (height, width, 3)
    # image_processor: uint8 = round-half-even(float * 255)
    assert np.array_equal(np.round(img_float * 255).astype(np.uint8), img_u8), f"{name}: pil != round(np*255)"
    st = check_image(name, img_u8)

    tok = pipe.tokenizer
    text, ids = tokenize_like_pipeline(tok, prompt)
    pe, ne = cap["embeds"][0]
    s = store
    s[f"{name}/input_ids"] = ids
    s[f"{name}/prompt_embeds"] = t2np(pe[0])
    assert s[f"{name}/prompt_embeds"].shape == (len(ids), 48)
    cfg_on = guidance > 0
    neg_text = neg_ids = None
    if cfg_on:
        neg_text, neg_ids = tokenize_like_pipeline(tok, negative if negative is not None else "")
        s[f"{name}/negative_input_ids"] = neg_ids
        s[f"{name}/negative_prompt_embeds"] = t2np(ne[0])
        assert s[f"{name}/negative_prompt_embeds"].shape == (len(neg_ids), 48)
    s[f"{name}/init_latents"] = init
    s[f"{name}/sigmas"] = sigmas.astype(np.float32)
    s[f"{name}/timesteps"] = timesteps.astype(np.float32)
    for i in range(min(n_calls, 2)):
        s[f"{name}/step{i}_input"] = cap[f"step{i}_input"]
        s[f"{name}/step{i}_timestep"] = cap[f"step{i}_timestep"].astype(np.float32)
        s[f"{name}/step{i}_output"] = cap[f"step{i}_output"]
    s[f"{name}/final_latents"] = t2np(lat)
    s[f"{name}/image_float"] = img_float
    s[f"{name}/image_uint8"] = img_u8

    pad32 = lambda n: n + (-n) % 32  # noqa: E731
    n_img = (height // 16) * (width // 16)
    meta["cases"][name] = {
        "kind": "pipeline", "prompt": prompt, "negative_prompt": negative, "height": height, "width": width,
        "steps": steps, "guidance_scale": guidance, "cfg": cfg_on, "dtype": dtype, "latent_seed": seed,
        "max_sequence_length": MAX_SEQ, "templated_text": text, "token_ids": ids.tolist(),
        "num_tokens": int(len(ids)), "caption_len_padded": pad32(len(ids)),
        "negative_templated_text": neg_text, "negative_token_ids": None if neg_ids is None else neg_ids.tolist(),
        "negative_num_tokens": None if neg_ids is None else int(len(neg_ids)),
        "negative_caption_len_padded": None if neg_ids is None else pad32(len(neg_ids)),
        "image_tokens": n_img, "image_tokens_padded": pad32(n_img),
        "sigmas": [float(x) for x in sigmas], "timesteps": [float(x) for x in timesteps],
        "transformer_calls": n_calls, "step0": cap["step0_dtypes"], "image_stats": st,
    }
    print(f"  [{name}] tokens={len(ids)}" + (f" neg_tokens={len(neg_ids)}" if cfg_on else "")
          + f" img_tokens={n_img} calls={n_calls} {dt:.2f}s")


def run_encode_long(pipe, store, meta) -> None:
    name = "encode_long"
    tok = pipe.tokenizer
    text, ids = tokenize_like_pipeline(tok, LONG_PROMPT)
    full = tok(text)["input_ids"]
    assert len(full) > MAX_SEQ and len(ids) == MAX_SEQ, (len(full), len(ids))
    pe, _ = pipe.encode_prompt(LONG_PROMPT, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQ)
    store[f"{name}/input_ids"] = ids
    store[f"{name}/prompt_embeds"] = t2np(pe[0])
    assert store[f"{name}/prompt_embeds"].shape == (MAX_SEQ, 48)
    meta["cases"][name] = {"kind": "encode", "prompt": LONG_PROMPT, "templated_text": text,
                           "untruncated_num_tokens": len(full), "num_tokens": int(len(ids)),
                           "token_ids": ids.tolist(), "max_sequence_length": MAX_SEQ}
    print(f"  [{name}] untruncated={len(full)} kept={len(ids)}")


def run_vae_decode(pipe, store, meta) -> None:
    name = "vae_decode"
    z = np.random.default_rng(VAE_DECODE_SEED).standard_normal((1, 16, 8, 12)).astype(np.float32)
    vae = pipe.vae
    with torch.no_grad():
        x = torch.from_numpy(z.copy()).to(vae.dtype)
        x = (x / vae.config.scaling_factor) + vae.config.shift_factor
        img = vae.decode(x, return_dict=False)[0]
        img = (img * 0.5 + 0.5).clamp(0, 1)
    store[f"{name}/latents"] = z
    store[f"{name}/image_float"] = t2np(img[0])
    u8 = np.round(t2np(img[0]).transpose(1, 2, 0) * 255).astype(np.uint8)
    st = check_image(name, u8)
    meta["cases"][name] = {"kind": "vae", "latent_seed": VAE_DECODE_SEED, "latent_shape": list(z.shape),
                           "image_shape": [3, 64, 96], "image_stats": st}


def run_vae_decode_tiled(pipe, store, meta) -> None:
    """diffusers' tiled_decode with small tiles (8 latents, 25 % overlap -> 16 px blends) on a
    latent of 2 x 3 tiles that does not divide evenly, for the runner's large-image path."""
    name = "vae_decode_tiled"
    tile = 8
    z = np.random.default_rng(VAE_DECODE_SEED + 1).standard_normal((1, 16, 14, 20)).astype(np.float32)
    vae = pipe.vae
    vae.enable_tiling()
    vae.tile_latent_min_size = tile
    vae.tile_sample_min_size = tile * 8
    try:
        with torch.no_grad():
            x = torch.from_numpy(z.copy()).to(vae.dtype)
            x = (x / vae.config.scaling_factor) + vae.config.shift_factor
            img = vae.decode(x, return_dict=False)[0]
            img = (img * 0.5 + 0.5).clamp(0, 1)
    finally:
        vae.disable_tiling()
    store[f"{name}/latents"] = z
    store[f"{name}/image_float"] = t2np(img[0])
    meta["cases"][name] = {"kind": "vae", "latent_seed": VAE_DECODE_SEED + 1, "latent_shape": list(z.shape),
                           "tile_latents": tile, "overlap_factor": 0.25, "image_shape": list(img.shape[1:])}


def sensitivity_report(pipe, store) -> dict:
    """Relative change of t2i_64x96's first transformer output when one ingredient is removed:
    each must visibly matter (else a port could get it wrong and still pass)."""
    tr = pipe.transformer
    x = [torch.from_numpy(store["t2i_64x96/step0_input"][0].copy())]
    t = torch.from_numpy(store["t2i_64x96/step0_timestep"].copy())
    capf = [torch.from_numpy(store["t2i_64x96/prompt_embeds"].copy())]

    def run(tt=t):
        with torch.no_grad():
            return tr(list(x), tt, list(capf), return_dict=False)[0][0]

    ref = run()
    assert np.array_equal(t2np(ref)[None], store["t2i_64x96/step0_output"]), "transformer replay mismatch"
    out = {}

    def rel(y):
        return float((y - ref).norm() / ref.norm())

    sd = {k: v.clone() for k, v in tr.state_dict().items()}
    ablations = {
        "x_pad_token=0": ["x_pad_token"], "cap_pad_token=0": ["cap_pad_token"],
    }
    for label, keys in ablations.items():
        with torch.no_grad():
            for k in keys:
                dict(tr.named_parameters())[k].zero_()
        out[label] = rel(run())
        tr.load_state_dict(sd)
    blocks = [f"noise_refiner.{i}" for i in range(len(tr.noise_refiner))] + \
             [f"context_refiner.{i}" for i in range(len(tr.context_refiner))] + \
             [f"layers.{i}" for i in range(len(tr.layers))]
    for b in blocks:
        blk = tr.get_submodule(b)
        orig = blk.forward
        blk.forward = lambda x_, *a, **k: x_
        out[f"skip {b}"] = rel(run())
        blk.forward = orig
        if getattr(blk, "modulation", False):
            d = tr.config.dim
            w = blk.adaLN_modulation[0]
            for gname, sl in (("gate_msa", slice(d, 2 * d)), ("gate_mlp", slice(3 * d, 4 * d))):
                with torch.no_grad():
                    w.weight[sl].zero_()
                    w.bias[sl].zero_()
                out[f"{b} {gname}=0"] = rel(run())
                tr.load_state_dict(sd)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "norm" in n and p.ndim == 1:
                p.fill_(1.0)
    out["all norm weights=1"] = rel(run())
    tr.load_state_dict(sd)
    out["timestep 1-t"] = rel(run(1.0 - t))
    print("  sensitivity (rel. change of step0 output):")
    for k, v in out.items():
        print(f"    {k:32s} {v:.4f}")
    assert min(out.values()) > 1e-2, "some ingredient barely changes the output"
    return {k: round(v, 4) for k, v in out.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- main
def main(fixture_dir: Path = DEFAULT_FIXTURE_DIR, goldens_dir: Path = DEFAULT_GOLDENS_DIR) -> dict:
    fixture_dir, goldens_dir = Path(fixture_dir), Path(goldens_dir)
    t_start = time.time()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    print(f"building tiny Z-Image pipeline -> {fixture_dir}")
    save_fixture(build_pipeline(), fixture_dir)

    # Everything below runs on pipelines loaded back from disk: the folder is self-contained.
    pipe = ZImagePipeline.from_pretrained(str(fixture_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    tok = pipe.tokenizer
    assert templated(tok, "P") == "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n"
    assert tok.padding_side == "right" and tok.pad_token == "<|endoftext|>"

    meta: dict = {
        "generator": "scripts/goldens_zimage.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "weight_seed": WEIGHT_SEED,
        "configs": {"text_encoder": TE_CONFIG, "transformer": TRANSFORMER_CONFIG, "vae": VAE_CONFIG,
                    "scheduler": SCHEDULER_CONFIG, "vocab_size": len(tok),
                    "special_token_ids": {t: tok.convert_tokens_to_ids(t) for t in
                                          ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]}},
        "cases": {},
    }
    store: dict[str, np.ndarray] = {}
    print("cases (float32):")
    for name, spec in CASES.items():
        if spec[6] == "float32":
            run_case(pipe, name, spec, store, meta)
    run_encode_long(pipe, store, meta)
    run_vae_decode(pipe, store, meta)
    run_vae_decode_tiled(pipe, store, meta)
    meta["sensitivity"] = sensitivity_report(pipe, store)

    print("cases (bfloat16):")
    pipe16 = ZImagePipeline.from_pretrained(str(fixture_dir), dtype=torch.bfloat16)
    pipe16.set_progress_bar_config(disable=True)
    for name, spec in CASES.items():
        if spec[6] == "bfloat16":
            run_case(pipe16, name, spec, store, meta)
    del pipe16

    # Reload once more from disk (fresh objects) and reproduce t2i_64x96's final latents exactly.
    chk = ZImagePipeline.from_pretrained(str(fixture_dir), dtype=torch.float32)
    chk.set_progress_bar_config(disable=True)
    p, n, h, w, st, g, _, seed = CASES["t2i_64x96"]
    lat = chk(prompt=p, height=h, width=w, num_inference_steps=st, guidance_scale=g, max_sequence_length=MAX_SEQ,
              latents=torch.from_numpy(latents_for(seed, h, w)), output_type="latent").images
    assert np.array_equal(t2np(lat), store["t2i_64x96/final_latents"]), "reload does not reproduce t2i_64x96"
    print("  reload check: t2i_64x96 final_latents reproduced bit-exactly")

    # safetensors.numpy writes raw buffers: make every array C-contiguous first.
    store = {k: np.ascontiguousarray(v) for k, v in store.items()}
    goldens_dir.mkdir(parents=True, exist_ok=True)
    ref_path = goldens_dir / "reference.safetensors"
    save_file(store, str(ref_path))
    meta["keys"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in store.items()}
    for k, v in store.items():
        case, key = k.split("/", 1)
        meta["cases"][case].setdefault("shapes", {})[key] = list(v.shape)
    meta["fixture_files"] = {
        str(f.relative_to(fixture_dir)): {"bytes": f.stat().st_size, "sha256": sha256(f)}
        for f in sorted(fixture_dir.rglob("*")) if f.is_file()
    }
    meta["reference_sha256"] = sha256(ref_path)
    (goldens_dir / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    total = sum(v["bytes"] for v in meta["fixture_files"].values())
    print(f"fixture: {len(meta['fixture_files'])} files, {total / 1e6:.2f} MB; "
          f"reference.safetensors {ref_path.stat().st_size / 1e6:.2f} MB sha256 {meta['reference_sha256'][:16]}")
    print(f"done in {time.time() - t_start:.1f}s")
    return meta


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture-dir", type=Path, default=DEFAULT_FIXTURE_DIR)
    ap.add_argument("--goldens-dir", type=Path, default=DEFAULT_GOLDENS_DIR)
    args = ap.parse_args()
    main(args.fixture_dir, args.goldens_dir)
    sys.exit(0)
