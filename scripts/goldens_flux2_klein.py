#!/usr/bin/env python3
"""Tiny random-weight FLUX.2 Klein fixtures + golden outputs of diffusers' Flux2KleinPipeline.

Builds two diffusers pipeline folders with the same tiny architecture:

    tests/fixtures/flux2-klein-tiny/        distilled Klein  (model_index.json: "is_distilled": true)
    tests/fixtures/flux2-klein-base-tiny/   undistilled base ("is_distilled": false -> true CFG)

and records reference outputs for parity tests that run WITHOUT torch:

    tests/goldens/flux2_klein/reference.safetensors   keys "<case>/<name>" (safetensors.numpy)
    tests/goldens/flux2_klein/reference.json          versions, per-case metadata, shapes
    tests/goldens/flux2_klein/ref_a.png, ref_b.png    reference (conditioning) input images
    tests/goldens/flux2_klein/<case>.png              8-bit output of each pipeline case (eyeballing only)

Usage (from the repository root; the side venv's bin/ shebangs are broken, call python directly):

    .goldens/bin/python scripts/goldens_flux2_klein.py
    .goldens/bin/python scripts/goldens_flux2_klein.py --fixtures-root tests/fixtures \
        --goldens-dir tests/goldens/flux2_klein

Needs torch (CPU), diffusers 0.42.1, transformers 5.x, tokenizers, safetensors, numpy, pillow. It never
touches the network: the tokenizer is trained here with `tokenizers`. Deterministic: weights come from
seeded torch generators, the initial latents from numpy's default_rng (always injected via `latents=`),
the VAE encoder uses the posterior mode; rerunning gives byte-identical safetensors (fixtures and goldens)
and JSON. Key list and what each case checks: tests/goldens/flux2_klein/README.md.

The model it builds is described in docs/models/flux2_klein.md.
"""

from __future__ import annotations

import argparse
import functools
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
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu  # noqa: E402
from golden_tokenizer import build_qwen_tokenizer  # noqa: E402  (scripts/, beside this file)
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
__import__("transformers").utils.logging.disable_progress_bar()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURES_ROOT = REPO_ROOT / "tests" / "fixtures"
DEFAULT_GOLDENS_DIR = REPO_ROOT / "tests" / "goldens" / "flux2_klein"
DISTILLED_NAME = "flux2-klein-tiny"
BASE_NAME = "flux2-klein-base-tiny"

# ----------------------------------------------------------------------------- tiny architecture
TE_HIDDEN = 32        # Qwen3 hidden size (real 2560); prompt_embeds width = 3 * 32 = 96
TE_LAYERS = 36        # as Qwen3-4B: hidden_states[9,18,27] are plain layer outputs; layers 27..35 unused
LATENT_CH = 4         # VAE latent channels (real 32) -> transformer in_channels 16 (real 128)
MAX_SEQ = 512         # pipeline default max_sequence_length

# Minimal Qwen3 chat template: for one user message with add_generation_prompt=True and
# enable_thinking=False it renders exactly what Qwen3's template renders:
#   "<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
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
    "user assistant think image edit make it night add a hat",
] * 8

PROMPT_T2I = "a tiny red fox, 3 apples & ünïcödé"
# > 512 tokens once templated: exercises truncation (the assistant/<think> suffix is cut off).
PROMPT_LONG = " ".join(["the quick brown fox jumps over the lazy dog near a red sofa"] * 45)
PROMPT_EDIT_ONE = "make it night and add a hat"
PROMPT_EDIT_TWO = "put the cat from image 2 on the sofa of image 1"
PROMPT_CFG = "portrait of an astronaut riding a horse"
NEGATIVE_CFG = "blurry, low quality"


# ----------------------------------------------------------------------------- builders
def build_tokenizer() -> Qwen2TokenizerFast:
    return build_qwen_tokenizer(CORPUS, CHAT_TEMPLATE)


def perturb_norms(module, gen):
    """Norm weights default to 1 and biases to 0: randomise them so that a swapped or missing norm weight
    shows up in a parity test."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            is_norm = ("norm" in leaf) or ("layernorm" in name)
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif is_norm and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build_text_encoder(tok, gen) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=TE_HIDDEN, intermediate_size=2 * TE_HIDDEN,
        num_hidden_layers=TE_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=1024, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), attention_bias=False, hidden_act="silu",
    )
    te = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # O(1)-scale weights so every layer visibly contributes
        for name, p in te.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    perturb_norms(te, gen)
    te.tie_weights()
    return te


def build_transformer(gen) -> Flux2Transformer2DModel:
    t = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CH, out_channels=None, num_layers=2, num_single_layers=2,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=3 * TE_HIDDEN,
        timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8), rope_theta=2000,
        eps=1e-6, guidance_embeds=False,
    ).eval()
    with torch.no_grad():  # N(0, 1/fan_in); gain 2 on the AdaLN / timestep paths so that gates are O(1)
        for name, p in t.named_parameters():  # and the reference tokens measurably change the output
            if p.ndim == 2:
                gain = 2.0 if ("modulation" in name or "time_guidance" in name or "norm_out" in name) else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    perturb_norms(t, gen)
    return t


def build_vae(gen) -> AutoencoderKLFlux2:
    v = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        latent_channels=LATENT_CH, norm_num_groups=8, sample_size=1024, use_quant_conv=True,
        use_post_quant_conv=True, mid_block_add_attention=True, batch_norm_eps=1e-4,
        batch_norm_momentum=0.1, patch_size=(2, 2),
    ).eval()
    perturb_norms(v, gen)
    with torch.no_grad():  # non-trivial latent statistics
        v.bn.running_mean.copy_(0.3 * torch.randn(v.bn.running_mean.shape, generator=gen))
        v.bn.running_var.copy_(0.5 + torch.rand(v.bn.running_var.shape, generator=gen))
    return v


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # The real Klein scheduler config (shift 3.0 is unused with dynamic shifting).
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )


def patch_configs(out_dir: Path) -> None:
    """Look like the real FLUX.2-klein repo to non-Python loaders:
    - model_index.json: transformers 5 writes "Qwen2Tokenizer"; the real repo says "Qwen2TokenizerFast"
      (the same class in transformers 5).
    - text_encoder/config.json: transformers 5 writes rope_parameters.rope_theta only; the real repo
      (transformers 4.x) has a top-level "rope_theta". Keep both."""
    mi_path = out_dir / "model_index.json"
    mi = json.loads(mi_path.read_text())
    mi["tokenizer"] = ["transformers", "Qwen2TokenizerFast"]
    mi_path.write_text(json.dumps(mi, indent=2) + "\n")
    te_path = out_dir / "text_encoder" / "config.json"
    te = json.loads(te_path.read_text())
    te["rope_theta"] = te.get("rope_parameters", {}).get("rope_theta", 1000000.0)
    te_path.write_text(json.dumps(te, indent=2) + "\n")


# ----------------------------------------------------------------------------- reference images
EXIF_ORIENTATION = 0x0112


def write_ref_images(goldens_dir: Path) -> dict:
    """ref_a.png: 90x120 (WxH) RGB.  ref_b.png: 150x100 RGBA with a varying alpha and an EXIF orientation
    tag of 6 (an eXIf chunk). diffusers drops alpha (convert("RGB"), no compositing) and ignores EXIF."""
    w, h = 90, 120
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = (x / (w - 1)) * 255.0
    g = (y / (h - 1)) * 255.0
    b = 127.5 + 127.5 * np.sin(x / 7.0) * np.cos(y / 5.0)
    a_arr = np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(a_arr, "RGB").save(goldens_dir / "ref_a.png")

    w, h = 150, 100
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rr = np.hypot(x - 0.3 * w, y - 0.6 * h)
    r = 127.5 + 127.5 * np.cos(rr / 6.0)
    g = np.where(((x // 12) + (y // 12)) % 2 == 0, 220.0, 40.0)
    b = 255.0 * (1.0 - x / (w - 1)) * (y / (h - 1))
    alpha = 64.0 + 191.0 * (x / (w - 1))  # never 0: the colour under the alpha is well defined
    b_arr = np.stack([r, g, b, alpha], -1).round().clip(0, 255).astype(np.uint8)
    img_b = Image.fromarray(b_arr, "RGBA")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    img_b.save(goldens_dir / "ref_b.png", exif=exif.tobytes())
    return {"ref_a": "ref_a.png", "ref_b": "ref_b.png"}


def load_ref(goldens_dir: Path, name: str) -> Image.Image:
    """Open the PNG exactly as a user would hand it to the pipeline (PIL, no EXIF transpose)."""
    img = Image.open(goldens_dir / f"{name}.png")
    img.load()
    return img


def ref_image_meta(img: Image.Image, k: int, multiple: int = 16) -> dict:
    w, h = img.size
    assert w * h <= 1024 * 1024, "the >1024^2 LANCZOS pre-resize path is not exercised here"
    w2, h2 = (w // multiple) * multiple, (h // multiple) * multiple
    left, top = (w - w2) // 2, (h - h2) // 2
    return {
        "file": None, "mode": img.mode, "orig_wh": [w, h],
        "exif_orientation": int(img.getexif().get(EXIF_ORIENTATION, 1)),
        "crop_box_ltrb": [left, top, left + w2, top + h2], "processed_wh": [w2, h2],
        "token_grid_hw": [h2 // multiple, w2 // multiple], "position_T": 10 * (k + 1),
    }


# ----------------------------------------------------------------------------- helpers
def t2np(x) -> np.ndarray:
    """torch -> contiguous numpy; floats as float32 (bf16 upcast is exact), ints as int32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x.to(torch.int64)
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype.kind in "iu" and x.dtype != np.uint8:
        assert np.abs(x).max(initial=0) < 2**31
        x = x.astype(np.int32)
    elif x.dtype.kind == "f":
        x = x.astype(np.float32)
    # safetensors.numpy writes the raw buffer: non-C-contiguous arrays would be silently scrambled
    return np.ascontiguousarray(x)


def f32_list(vec) -> list[float]:
    """float32 values as the shortest decimals that round-trip to the same float32."""
    arr = np.asarray(vec, dtype=np.float32).reshape(-1)
    return [float(np.format_float_positional(v, unique=True, trim="-")) for v in arr]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenize(pipe, prompt: str) -> tuple[str, np.ndarray, np.ndarray]:
    """Exactly Flux2KleinPipeline._get_qwen3_prompt_embeds' tokenization."""
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    enc = pipe.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_SEQ)
    return text, t2np(enc["input_ids"]), t2np(enc["attention_mask"])


def image_stats(img01: np.ndarray) -> dict:
    u8 = (img01 * 255).round()
    return {"mean": round(float(img01.mean()), 4), "std": round(float(img01.std()), 4),
            "frac_0_or_255": round(float(((u8 <= 0) | (u8 >= 255)).mean()), 4)}


def check_image(name: str, img01: np.ndarray) -> dict:
    st = image_stats(img01)
    print(f"  [{name}] image mean {st['mean']:.3f} std {st['std']:.3f} saturated {st['frac_0_or_255']:.3f}")
    assert st["std"] > 0.05, f"{name}: decoded image is flat"
    assert st["frac_0_or_255"] < 0.2, f"{name}: decoded image is saturated"
    return st


# ----------------------------------------------------------------------------- pipeline capture
class Capture:
    """Wraps encode_prompt, prepare_latents, prepare_image_latents, _encode_vae_image, vae.encode,
    vae.decode, scheduler.set_timesteps and transformer.forward of one pipeline for one call."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.d: dict = {"encode": [], "tf": [], "steps": [], "ref_pixels": [], "ref_moments": [],
                        "ref_bn": []}

    def __enter__(self):
        p, d = self.pipe, self.d
        self.orig = {k: getattr(p, k) for k in ("encode_prompt", "prepare_latents", "prepare_image_latents",
                                                 "_encode_vae_image")}
        self.orig_vae = (p.vae.encode, p.vae.decode)
        self.orig_set_timesteps = p.scheduler.set_timesteps
        self.orig_fwd = p.transformer.forward
        o = self.orig

        def encode_prompt(*a, **k):
            pe, ti = o["encode_prompt"](*a, **k)
            d["encode"].append((t2np(pe), t2np(ti)))
            return pe, ti

        def prepare_latents(*a, **k):
            lat, ids = o["prepare_latents"](*a, **k)
            d["packed_init"], d["latent_ids"] = t2np(lat), t2np(ids)
            return lat, ids

        def prepare_image_latents(*a, **k):
            il, iids = o["prepare_image_latents"](*a, **k)
            d["image_latents"], d["image_latent_ids"] = t2np(il), t2np(iids)
            return il, iids

        def encode_vae_image(image, generator):
            d["ref_pixels"].append(t2np(image))
            out = o["_encode_vae_image"](image=image, generator=generator)
            d["ref_bn"].append(t2np(out))
            return out

        def vae_encode(x, *a, **k):
            out = self.orig_vae[0](x, *a, **k)
            d["ref_moments"].append(t2np(out.latent_dist.parameters))
            return out

        def vae_decode(z, *a, **k):
            d["vae_in"] = t2np(z)
            out = self.orig_vae[1](z, *a, **k)
            d["vae_out"] = t2np(out[0] if isinstance(out, tuple) else out.sample)
            return out

        @functools.wraps(self.orig_set_timesteps)  # retrieve_timesteps inspects the signature
        def set_timesteps(*a, **k):
            d["mu"] = k.get("mu")
            d["sigmas_in"] = None if k.get("sigmas") is None else [float(s) for s in k["sigmas"]]
            return self.orig_set_timesteps(*a, **k)

        def forward(*a, **k):
            assert not a, "the pipeline calls the transformer with keyword arguments only"
            out = self.orig_fwd(**k)
            rec = {n: t2np(k[n]) for n in ("hidden_states", "encoder_hidden_states", "timestep",
                                           "img_ids", "txt_ids")}
            rec["guidance"] = k.get("guidance")
            rec["output"] = t2np(out[0])
            d["tf"].append(rec)
            return out

        p.encode_prompt, p.prepare_latents = encode_prompt, prepare_latents
        p.prepare_image_latents, p._encode_vae_image = prepare_image_latents, encode_vae_image
        p.vae.encode, p.vae.decode = vae_encode, vae_decode
        p.scheduler.set_timesteps = set_timesteps
        p.transformer.forward = forward
        return self

    def on_step_end(self, pipe, i, t, kw):
        self.d["steps"].append(t2np(kw["latents"]))
        return {}

    def __exit__(self, *exc):
        p = self.pipe
        for k in self.orig:  # drop the instance attributes -> class methods again
            delattr(p, k)
        del p.vae.encode, p.vae.decode
        del p.scheduler.set_timesteps
        del p.transformer.forward
        return False


def run_pipe(pipe, output_type: str, **kw) -> tuple[object, dict]:
    with Capture(pipe) as cap:
        out = pipe(output_type=output_type, callback_on_step_end=cap.on_step_end,
                   callback_on_step_end_tensor_inputs=["latents"], max_sequence_length=MAX_SEQ, **kw)
    cap.d["sched_sigmas"] = t2np(pipe.scheduler.sigmas)
    cap.d["sched_timesteps"] = t2np(pipe.scheduler.timesteps)
    return out.images, cap.d


def run_case(pipe, name: str, store: dict, meta: dict, goldens_dir: Path, *, prompt: str,
             height: int | None, width: int | None, steps: int, guidance: float, latent_hw: tuple[int, int],
             seed: int, images: list[str] | None = None, negative_prompt: str | None = None,
             dtype_name: str = "float32", latents: np.ndarray | None = None) -> None:
    t0 = time.time()
    c = pipe.transformer.config.in_channels
    if latents is None:
        latents = np.random.default_rng(seed).standard_normal((1, c, *latent_hw)).astype(np.float32)
    pil_images = [load_ref(goldens_dir, n) for n in images] if images else None
    cfg = guidance > 1 and not pipe.config.is_distilled

    kw = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
              latents=torch.from_numpy(latents.copy()))
    if height is not None:
        kw["height"] = height
    if width is not None:
        kw["width"] = width
    if pil_images is not None:
        kw["image"] = pil_images if len(pil_images) > 1 else pil_images[0]
    neg_embeds = None
    if negative_prompt is not None:
        # diffusers 0.42.1 Flux2KleinPipeline.__call__ has no `negative_prompt` argument: a custom
        # negative prompt can only enter as negative_prompt_embeds, encoded the same way as the prompt.
        assert cfg
        neg_embeds, _ = pipe.encode_prompt(prompt=negative_prompt, max_sequence_length=MAX_SEQ)
        kw["negative_prompt_embeds"] = neg_embeds

    final_latents, d = run_pipe(pipe, "latent", **kw)
    img_np, d2 = run_pipe(pipe, "np", **kw)
    # Both runs are the same computation: check it (determinism + capture sanity).
    assert len(d["tf"]) == len(d2["tf"]) == steps * (2 if cfg else 1)
    for r1, r2 in zip(d["tf"], d2["tf"]):
        assert np.array_equal(r1["output"], r2["output"]), f"{name}: nondeterministic transformer"
    assert np.array_equal(t2np(final_latents), d2["vae_in"]), f"{name}: latent output != decoder input"

    img_float = t2np(img_np[0])                       # [H, W, 3] float32 in [0, 1]
    pil = pipe.image_processor.numpy_to_pil(img_np)[0]  # what output_type="pil" returns
    img_u8 = np.ascontiguousarray(np.asarray(pil, dtype=np.uint8))
    pil.save(goldens_dir / f"{name}.png")
    stats = check_image(name, img_float)

    text, ids, mask = tokenize(pipe, prompt)
    s = {}
    s["input_ids"], s["attention_mask"] = ids, mask
    pe, ti = d["encode"][0]
    s["prompt_embeds"], s["text_ids"] = pe, ti
    neg_meta = None
    if cfg:
        npe, nti = d["encode"][1]
        neg_text = "" if negative_prompt is None else negative_prompt
        ntext, nids, nmask = tokenize(pipe, neg_text)
        s["negative_input_ids"], s["negative_attention_mask"] = nids, nmask
        s["negative_prompt_embeds"], s["negative_text_ids"] = npe, nti
        if neg_embeds is not None:
            assert np.array_equal(npe, t2np(neg_embeds))
        neg_meta = {"negative_prompt": negative_prompt, "negative_prompt_used": neg_text,
                    "negative_templated_text": ntext, "negative_num_valid_tokens": int(nmask.sum()),
                    "negative_token_ids": nids[0, : int(nmask.sum())].tolist(),
                    "negative_via": "negative_prompt_embeds" if negative_prompt is not None
                    else "pipeline default (\"\")"}
    s["init_latents"] = latents
    s["packed_init_latents"], s["latent_ids"] = d["packed_init"], d["latent_ids"]
    refs_meta = None
    if pil_images is not None:
        refs_meta = []
        for k, (n, img) in enumerate(zip(images, pil_images)):
            m = ref_image_meta(img, k)
            m["file"] = f"{n}.png"
            refs_meta.append(m)
            s[f"ref{k}_pixels"] = d["ref_pixels"][k]           # [1,3,h',w'] in [-1,1] (VAE encoder input)
            s[f"ref{k}_moments"] = d["ref_moments"][k]         # quant_conv output [1,2*lat,h'/8,w'/8]
            s[f"ref{k}_latents_bn"] = d["ref_bn"][k]           # patchified + BN-normalised [1,16,h'/16,w'/16]
            assert list(d["ref_pixels"][k].shape[2:]) == m["processed_wh"][::-1]
        s["image_latents"], s["image_latent_ids"] = d["image_latents"], d["image_latent_ids"]
    s["sigmas"], s["timesteps"] = d["sched_sigmas"], d["sched_timesteps"]
    for j, st in enumerate(d["steps"]):
        s[f"latents_after_step{j}"] = st
    calls = d["tf"][: 2 if cfg else 1]
    aliases = {}
    for prefix, rec in zip(["step0", "step0_uncond"], calls):
        s[f"{prefix}_input"] = rec["hidden_states"]
        # encoder_hidden_states is bit-identical to (negative_)prompt_embeds: stored once, aliased in the JSON
        src = "prompt_embeds" if prefix == "step0" else "negative_prompt_embeds"
        assert np.array_equal(rec["encoder_hidden_states"], s[src]), f"{name}: {prefix} text input"
        aliases[f"{prefix}_encoder_hidden_states"] = src
        s[f"{prefix}_img_ids"] = rec["img_ids"]
        s[f"{prefix}_txt_ids"] = rec["txt_ids"]
        s[f"{prefix}_timestep"] = rec["timestep"]
        s[f"{prefix}_output"] = rec["output"]
        assert rec["guidance"] is None
    # Later steps (teacher forcing per step): the transformer input, timestep and raw output of every call.
    # img_ids / txt_ids / encoder_hidden_states do not change between steps (asserted).
    per_step = 2 if cfg else 1
    for i in range(1, steps):
        rec = d["tf"][per_step * i]
        for n, ref0 in (("img_ids", "step0_img_ids"), ("txt_ids", "step0_txt_ids"),
                        ("encoder_hidden_states", "prompt_embeds")):
            assert np.array_equal(rec[n], s[ref0]), f"{name}: {n} changed at step {i}"
        s[f"step{i}_input"], s[f"step{i}_timestep"], s[f"step{i}_output"] = \
            rec["hidden_states"], rec["timestep"], rec["output"]
        if cfg:
            u = d["tf"][per_step * i + 1]
            assert np.array_equal(u["hidden_states"], rec["hidden_states"])
            assert np.array_equal(u["timestep"], rec["timestep"])
            assert np.array_equal(u["encoder_hidden_states"], s["negative_prompt_embeds"])
            s[f"step{i}_uncond_output"] = u["output"]
    # Sensitivity checks, so that a test can see a dropped reference image or a broken CFG.
    sens = {}
    li = latent_hw[0] * latent_hw[1]
    if pil_images is not None:
        rec = d["tf"][0]
        with torch.no_grad():
            no_ref = pipe.transformer(
                hidden_states=torch.from_numpy(rec["hidden_states"][:, :li].copy()).to(pipe.transformer.dtype),
                timestep=torch.from_numpy(rec["timestep"].copy()).to(pipe.transformer.dtype),
                guidance=None, encoder_hidden_states=torch.from_numpy(pe.copy()).to(pipe.transformer.dtype),
                txt_ids=torch.from_numpy(ti.copy()).long(),
                img_ids=torch.from_numpy(rec["img_ids"][:, :li].copy()).long(), return_dict=False)[0]
        sens["step0_max_abs_change_from_reference_tokens"] = round(
            float(np.abs(t2np(no_ref) - rec["output"][:, :li]).max()), 4)
        assert sens["step0_max_abs_change_from_reference_tokens"] > 0.05
    if cfg:
        sens["step0_max_abs_cond_minus_uncond"] = round(
            float(np.abs(d["tf"][0]["output"] - d["tf"][1]["output"]).max()), 4)
        assert sens["step0_max_abs_cond_minus_uncond"] > 0.05
    s["final_latents"] = t2np(final_latents)
    s["image_float"] = img_float
    s["image_uint8"] = img_u8
    for k, v in s.items():
        store[f"{name}/{k}"] = t2np(v) if v.dtype != np.uint8 else np.ascontiguousarray(v)

    nvalid = int(mask.sum())
    out_h, out_w = img_u8.shape[:2]
    meta["cases"][name] = {
        "fixture": meta["_fixture_of"][id(pipe)],
        "dtype": dtype_name,
        "is_distilled": bool(pipe.config.is_distilled),
        "cfg": cfg,
        "prompt": prompt,
        "templated_text": text,
        "num_valid_tokens": nvalid,
        "token_ids": ids[0, :nvalid].tolist(),
        "truncated": nvalid == MAX_SEQ,
        **(neg_meta or {"negative_prompt": None}),
        "height_arg": height, "width_arg": width,
        "output_hw": [out_h, out_w],
        "latent_grid_hw": list(latent_hw),
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "init_latents": f"np.random.default_rng({seed}).standard_normal([1,{c},{latent_hw[0]},{latent_hw[1]}])"
                        ".astype(float32)",
        "mu": d["mu"],
        "sigmas_before_shift": d["sigmas_in"],
        "sigmas": f32_list(d["sched_sigmas"]),
        "timesteps": f32_list(d["sched_timesteps"]),
        "transformer_calls": len(d["tf"]),
        "transformer_call_order": "per step: cond, uncond (two batch-1 calls)" if cfg else "one call per step",
        "aliases": aliases,
        "reference_images": refs_meta,
        "image_stats": stats,
        "sensitivity": sens,
    }
    assert d["mu"] == compute_empirical_mu(latent_hw[0] * latent_hw[1], steps)
    assert (out_h, out_w) == (16 * latent_hw[0], 16 * latent_hw[1])
    print(f"  [{name}] {time.time() - t0:.2f}s, out {out_h}x{out_w}, mu {d['mu']:.6f}, "
          f"{len(d['tf'])} transformer calls, final |x| max {np.abs(s['final_latents']).max():.3f}")


def vae_decode_case(pipe, store: dict, meta: dict, hw=(5, 7), seed=4242) -> None:
    """Seeded packed latents -> decode path of Flux2KleinPipeline.__call__ (unpack with ids, BN-denormalise,
    unpatchify, vae.decode, postprocess)."""
    h, w = hw
    c = pipe.transformer.config.in_channels
    packed = np.random.default_rng(seed).standard_normal((1, h * w, c)).astype(np.float32)
    x = torch.from_numpy(packed.copy())
    ids = pipe._prepare_latent_ids(torch.zeros(1, c, h, w))
    with torch.no_grad():
        lat = pipe._unpack_latents_with_ids(x, ids, h, w)
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        denorm = lat * std + mean
        vae_in = pipe._unpatchify_latents(denorm)
        dec = pipe.vae.decode(vae_in, return_dict=False)[0]
        img = pipe.image_processor.postprocess(dec, output_type="np")
    u8 = np.asarray(pipe.image_processor.numpy_to_pil(img)[0], dtype=np.uint8)
    stats = check_image("vae_decode", img[0])
    s = {"packed_latents": packed, "latent_ids": t2np(ids), "latents_unpacked": t2np(lat),
         "latents_denormalized": t2np(denorm), "vae_input": t2np(vae_in), "decoded": t2np(dec),
         "image_float": t2np(img[0]), "image_uint8": np.ascontiguousarray(u8)}
    for k, v in s.items():
        store[f"vae_decode/{k}"] = v
    meta["cases"]["vae_decode"] = {
        "fixture": DISTILLED_NAME, "dtype": "float32", "latent_grid_hw": [h, w], "output_hw": [16 * h, 16 * w],
        "packed_latents": f"np.random.default_rng({seed}).standard_normal([1,{h * w},{c}]).astype(float32)",
        "image_stats": stats,
    }


def vae_encode_case(pipe, store: dict, meta: dict, goldens_dir: Path, name="ref_b") -> None:
    """Reference image -> the normalised, patchified, packed latents the pipeline makes from it
    (preprocess exactly as __call__ step 4, then prepare_image_latents, posterior mode)."""
    img = load_ref(goldens_dir, name)
    m = ref_image_meta(img, 0)
    m["file"] = f"{name}.png"
    w2, h2 = m["processed_wh"]
    rgb_u8 = np.array(pipe.image_processor._resize_and_crop(img, w2, h2).convert("RGB"), dtype=np.uint8)
    pixels = pipe.image_processor.preprocess(img, height=h2, width=w2, resize_mode="crop")
    with Capture(pipe) as cap, torch.no_grad():
        packed, ids = pipe.prepare_image_latents(images=[pixels], batch_size=1, generator=None,
                                                 device=torch.device("cpu"), dtype=pipe.vae.dtype)
    d = cap.d
    moments = d["ref_moments"][0]
    s = {"rgb_uint8": np.ascontiguousarray(rgb_u8), "pixels": t2np(pixels), "moments": moments,
         "latent_mode": np.ascontiguousarray(moments[:, :LATENT_CH]),
         "latents_normalized": d["ref_bn"][0], "packed": t2np(packed), "ids": t2np(ids)}
    assert np.array_equal(s["pixels"], d["ref_pixels"][0])
    assert np.array_equal(s["pixels"], t2np(torch.from_numpy(rgb_u8).permute(2, 0, 1)[None].float() / 255 * 2 - 1))
    for k, v in s.items():
        store[f"vae_encode/{k}"] = v
    meta["cases"]["vae_encode"] = {"fixture": DISTILLED_NAME, "dtype": "float32", "reference_image": m}


# ----------------------------------------------------------------------------- main
def build_fixture(path: Path, *, is_distilled: bool, tok, te, vae, transformer) -> None:
    if path.exists():
        shutil.rmtree(path)
    pipe = Flux2KleinPipeline(scheduler=build_scheduler(), vae=vae, text_encoder=te, tokenizer=tok,
                              transformer=transformer, is_distilled=is_distilled)
    pipe.save_pretrained(str(path), safe_serialization=True)
    patch_configs(path)


def main(fixtures_root: Path = DEFAULT_FIXTURES_ROOT, goldens_dir: Path = DEFAULT_GOLDENS_DIR) -> None:
    t_start = time.time()
    fixtures_root, goldens_dir = Path(fixtures_root), Path(goldens_dir)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and reductions never depend on the core count
    goldens_dir.mkdir(parents=True, exist_ok=True)
    fixtures_root.mkdir(parents=True, exist_ok=True)
    distilled_dir, base_dir = fixtures_root / DISTILLED_NAME, fixtures_root / BASE_NAME

    # --- fixtures. Distilled and base share tokenizer, text encoder, VAE (as the real Klein 4B / base 4B
    # repos share Qwen3-4B and the FLUX.2 VAE); the base transformer has its own weights.
    torch.manual_seed(0)  # default module init (e.g. VAE convs) uses the global RNG
    gen = torch.Generator().manual_seed(0)
    tok = build_tokenizer()
    vae = build_vae(gen)
    te = build_text_encoder(tok, gen)
    tr_distilled = build_transformer(gen)
    torch.manual_seed(1)
    tr_base = build_transformer(torch.Generator().manual_seed(1))
    build_fixture(distilled_dir, is_distilled=True, tok=tok, te=te, vae=vae, transformer=tr_distilled)
    build_fixture(base_dir, is_distilled=False, tok=tok, te=te, vae=vae, transformer=tr_base)
    del vae, te, tr_distilled, tr_base
    print(f"fixtures written ({time.time() - t_start:.1f}s)")

    # --- reload from disk: the goldens come from the saved folders
    pipe = Flux2KleinPipeline.from_pretrained(str(distilled_dir), dtype=torch.float32)
    base = Flux2KleinPipeline.from_pretrained(str(base_dir), dtype=torch.float32)
    assert pipe.config.is_distilled is True and base.config.is_distilled is False
    for p in (pipe, base):
        p.set_progress_bar_config(disable=True)

    refs = write_ref_images(goldens_dir)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": __import__("transformers").__version__,
                "tokenizers": __import__("tokenizers").__version__,
                "safetensors": __import__("safetensors").__version__, "numpy": np.__version__,
                "pillow": PIL.__version__}
    meta: dict = {"versions": versions, "fixtures": {}, "reference_images": refs, "cases": {},
                  "_fixture_of": {id(pipe): DISTILLED_NAME, id(base): BASE_NAME}}
    store: dict = {}

    # 96x128 = H x W; tokens 6x8 = 48
    common = dict(height=96, width=128, latent_hw=(6, 8))
    run_case(pipe, "t2i", store, meta, goldens_dir, prompt=PROMPT_T2I, steps=4, guidance=1.0, seed=1234,
             **common)
    # Square, 2 steps, a >512-token prompt (truncation), and guidance 4.0 which distilled Klein ignores.
    run_case(pipe, "t2i_square", store, meta, goldens_dir, prompt=PROMPT_LONG, height=64, width=64, steps=2,
             guidance=4.0, latent_hw=(4, 4), seed=1235)
    # One reference, no width/height: output size = first reference after floor-to-16 + crop (90x120 -> 80x112).
    run_case(pipe, "edit_one", store, meta, goldens_dir, prompt=PROMPT_EDIT_ONE, height=None, width=None,
             steps=4, guidance=1.0, latent_hw=(7, 5), seed=1236, images=["ref_a"])
    run_case(pipe, "edit_two", store, meta, goldens_dir, prompt=PROMPT_EDIT_TWO, steps=4, guidance=1.0,
             seed=1237, images=["ref_a", "ref_b"], **common)
    run_case(base, "cfg_base", store, meta, goldens_dir, prompt=PROMPT_CFG, steps=3, guidance=4.0, seed=1238,
             negative_prompt=NEGATIVE_CFG, **common)
    run_case(base, "cfg_base_default_negative", store, meta, goldens_dir, prompt=PROMPT_CFG, steps=3,
             guidance=4.0, seed=1238, **common)
    vae_decode_case(pipe, store, meta)
    vae_encode_case(pipe, store, meta, goldens_dir)
    del base

    # bf16: the same fp32 fixture cast to bfloat16 at load (round-to-nearest-even), same inputs as t2i.
    pipe_bf16 = Flux2KleinPipeline.from_pretrained(str(distilled_dir), dtype=torch.bfloat16)
    pipe_bf16.set_progress_bar_config(disable=True)
    meta["_fixture_of"][id(pipe_bf16)] = DISTILLED_NAME
    run_case(pipe_bf16, "bf16_t2i", store, meta, goldens_dir, prompt=PROMPT_T2I, steps=4, guidance=1.0,
             seed=1234, dtype_name="bfloat16", latents=store["t2i/init_latents"], **common)
    del meta["_fixture_of"]

    for name, folder, distilled in ((DISTILLED_NAME, distilled_dir, True), (BASE_NAME, base_dir, False)):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        meta["fixtures"][name] = {
            "is_distilled": distilled,
            "bytes": sum(p.stat().st_size for p in files),
            "sha256": {str(p.relative_to(folder)): sha256_file(p) for p in files if p.suffix == ".safetensors"},
        }
    meta["tiny_config"] = {
        "text_encoder": {"hidden_size": TE_HIDDEN, "num_hidden_layers": TE_LAYERS, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 2 * TE_HIDDEN,
                         "vocab_size": len(pipe.tokenizer), "hidden_states_layers": [9, 18, 27]},
        "transformer": {k: pipe.transformer.config[k] for k in (
            "in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "axes_dims_rope", "rope_theta", "mlp_ratio", "guidance_embeds")},
        "vae": {"block_out_channels": list(pipe.vae.config.block_out_channels),
                "layers_per_block": pipe.vae.config.layers_per_block,
                "latent_channels": pipe.vae.config.latent_channels,
                "norm_num_groups": pipe.vae.config.norm_num_groups,
                "batch_norm_eps": pipe.vae.config.batch_norm_eps},
        "vae_scale_factor": pipe.vae_scale_factor,
    }
    meta["shapes"] = {k: [str(v.dtype), list(v.shape)] for k, v in sorted(store.items())}

    out = goldens_dir / "reference.safetensors"
    save_file(store, str(out))
    (goldens_dir / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({out.stat().st_size} B, {len(store)} tensors, sha256 {sha256_file(out)[:16]}) "
          f"in {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures-root", type=Path, default=DEFAULT_FIXTURES_ROOT)
    ap.add_argument("--goldens-dir", type=Path, default=DEFAULT_GOLDENS_DIR)
    args = ap.parse_args()
    main(args.fixtures_root, args.goldens_dir)
