"""Benchmark LLMs: the tiny test fixture, and a Qwen3-0.6B-shaped model with random weights (and its 4- and 8-bit
quantizations by mlx-lm's own converter, what users download).

The 0.6B-shaped folder is written once into ~/.cache/mlxrunner-bench/ (about 1.2 GB in bf16,
2.4 GB in float32): config.json with Qwen3-0.6B's architecture, random normal weights (std 0.02)
under Hugging Face names, and the tiny fixture's tokenizer (prompts are token ids < 500).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

import mlxrunner  # noqa: F401, I001  (before mlx.core: routes MLX's CPU BLAS to OpenBLAS)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
GEMMA3_TINY = ROOT / "tests" / "fixtures" / "llm" / "gemma3-tiny"
CACHE = Path.home() / ".cache" / "mlxrunner-bench"

QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
    "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960, "attention_bias": False, "hidden_act": "silu",
}


def qwen3_06b(dtype: str = "bfloat16") -> Path:
    """The folder of a Qwen3-0.6B-shaped model in `dtype` ("bfloat16" or "float32"), built on first use.

    The same key gives the same normal draws for both dtypes (float32 is not a bf16 upcast).
    config.json is written last, so a folder interrupted mid-build is rebuilt, not reused.
    """
    folder = CACHE / f"qwen3-0.6b-shaped-{dtype}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    c = QWEN3_06B
    mx_dtype = getattr(mx, dtype)
    h, d, q, kv, i = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], \
        c["intermediate_size"]
    key = mx.random.key(0)

    def rand(*shape):
        nonlocal key
        key, sub = mx.random.split(key)
        return (0.02 * mx.random.normal(shape, key=sub)).astype(mx_dtype)

    weights = {"model.embed_tokens.weight": rand(c["vocab_size"], h), "model.norm.weight": mx.ones((h,), mx_dtype)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        weights.update({
            p + "self_attn.q_proj.weight": rand(q * d, h), p + "self_attn.k_proj.weight": rand(kv * d, h),
            p + "self_attn.v_proj.weight": rand(kv * d, h), p + "self_attn.o_proj.weight": rand(h, q * d),
            p + "self_attn.q_norm.weight": mx.ones((d,), mx_dtype),
            p + "self_attn.k_norm.weight": mx.ones((d,), mx_dtype),
            p + "input_layernorm.weight": mx.ones((h,), mx_dtype),
            p + "post_attention_layernorm.weight": mx.ones((h,), mx_dtype),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
        })
    (folder / "config.json").unlink(missing_ok=True)
    partial = folder / "model.partial.safetensors"
    mx.save_safetensors(str(partial), weights)
    partial.replace(folder / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, folder / name)
    (folder / "config.json").write_text(json.dumps({**c, "torch_dtype": dtype}))
    return folder


def quantized_06b(bits: int) -> Path:
    """The bf16 Qwen3-0.6B-shaped folder quantized by mlx-lm's converter (`mlx_lm.convert -q`: affine, group 64,
    the tied embedding packed too), built on first use; needs mlx-lm (the bench venv)."""
    folder = CACHE / f"qwen3-0.6b-shaped-q{bits}"
    if (folder / "config.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # mlx-lm refuses a folder that exists
    convert = ("import mlxrunner, sys; from mlx_lm import convert; "
               "convert(sys.argv[1], mlx_path=sys.argv[2], quantize=True, q_bits=int(sys.argv[3]), q_group_size=64)")
    subprocess.run([sys.executable, "-c", convert, str(qwen3_06b("bfloat16")), str(folder), str(bits)], check=True)
    return folder


if __name__ == "__main__":  # python -m benchmarks.cpu.llm_models: build both folders ahead of a run
    for name in ("bfloat16", "float32"):
        print(qwen3_06b(name))
