"""Random-weight Hugging Face LLM folders at full size, bf16, written with transformers' save_pretrained.

    python -m benchmarks.gpu.llm_shapes NAME FOLDER     # build one folder (llm_bench runs this in a subprocess)
    python -m benchmarks.gpu.llm_shapes --count         # parameter counts of the full-size shapes (meta device)

- "qwen3-0.6b": Qwen3-0.6B's shape (0.596B parameters, tied embeddings), ~1.2 GB.
- "qwen3-4b": Qwen3-4B's shape (4.02B, tied), ~8 GB; saved as Qwen3ForCausalLM, so it also serves
  as the text encoder of the Z-Image / Flux2-Klein pipelines (diffusers loads it as Qwen3Model).
- "llama3-8b": Llama-3-8B's shape (8.03B, untied lm_head, rope_theta 500000), ~16 GB.
- "tiny", "tiny-llama": a 2-layer Qwen3 / Llama (untied) of hidden 64 (vocabulary 503), for testing
  the benchmark on a CPU.

Weights: transformers' own init (normal, std initializer_range = 0.02; norms ones), bf16. The model
is constructed directly on CUDA when there is one (an 8B model initialises in seconds). Each folder
also gets the tiny fixture's tokenizer files (the benchmark's prompts are token ids < 500).

config.json: transformers 5 writes rope_theta only inside rope_parameters; mlx-lm's llama.py reads
a top-level rope_theta only (it would silently use 10000), so a top-level copy is added, the same
value, for every model. A marker file, written last, tells a complete folder from an interrupted
build; an incomplete folder is deleted and rebuilt.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
MARKER = ".llm_bench_complete"

# (transformers class, config kwargs). rope_theta goes into rope_parameters (transformers 5's form).
SHAPES: dict[str, tuple[str, dict]] = {
    "tiny": ("Qwen3ForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=503, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=4096, bos_token_id=500, eos_token_id=502, pad_token_id=500)),
    "tiny-llama": ("LlamaForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=503, tie_word_embeddings=False, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=500, eos_token_id=502, pad_token_id=500)),
    "qwen3-0.6b": ("Qwen3ForCausalLM", dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)),
    "qwen3-4b": ("Qwen3ForCausalLM", dict(
        hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)),
    "llama3-8b": ("LlamaForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)),
}
EXPECTED_PARAMS = {"qwen3-0.6b": 0.596e9, "qwen3-4b": 4.02e9, "llama3-8b": 8.03e9}


def _config(name: str):
    import transformers

    cls_name, kwargs = SHAPES[name]
    kwargs = dict(kwargs)
    theta = kwargs.pop("rope_theta")
    config_cls = transformers.Qwen3Config if cls_name.startswith("Qwen3") else transformers.LlamaConfig
    kwargs.update(attention_bias=False, hidden_act="silu", initializer_range=0.02, use_cache=True)
    if cls_name.startswith("Llama"):
        kwargs["mlp_bias"] = False
    try:  # transformers >= 5
        config = config_cls(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:  # older transformers
        config = config_cls(**kwargs, rope_theta=theta)
    config.architectures = [cls_name]
    return getattr(transformers, cls_name), config


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).exists()


def build(name: str, folder: str | Path) -> Path:
    """Write the folder of model `name` unless a complete one is there."""
    folder = Path(folder)
    if is_complete(folder):
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted build
    import torch

    model_cls, config = _config(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), torch.no_grad():
            model = model_cls(config)
        model = model.to(torch.bfloat16)
        # transformers' init draws normal(0, 0.02) for Linear/Embedding and ones for the RMSNorms; check it ran.
        weight = model.model.layers[0].mlp.down_proj.weight.detach().float()
        std = float(weight.std())
        assert 0.015 < std < 0.025, f"{name}: unexpected init std {std} (transformers' init did not run?)"
        assert float(model.model.norm.weight.detach().float().min()) == 1.0
        tmp = folder.with_name(folder.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        torch.set_default_dtype(previous)
    del model
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    config_path = tmp / "config.json"
    saved = json.loads(config_path.read_text())
    theta = saved.get("rope_theta") or (saved.get("rope_parameters") or {}).get("rope_theta")
    assert theta == SHAPES[name][1]["rope_theta"], f"{name}: rope_theta {theta} in config.json"
    saved["rope_theta"] = theta  # mlx-lm's llama.py reads only this one (see the module's docstring)
    if "dtype" not in saved and "torch_dtype" not in saved:
        saved["torch_dtype"] = "bfloat16"
    config_path.write_text(json.dumps(saved, indent=2) + "\n")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / file, tmp / file)
    tmp.rename(folder)
    (folder / MARKER).write_text("ok\n")
    return folder


def qwen3_0_6b(folder: str | Path) -> Path:
    return build("qwen3-0.6b", folder)


def qwen3_4b(folder: str | Path) -> Path:
    return build("qwen3-4b", folder)


def llama3_8b(folder: str | Path) -> Path:
    return build("llama3-8b", folder)


def tiny(folder: str | Path) -> Path:
    return build("tiny", folder)


def count_parameters(name: str) -> int:
    """Parameters of the shape (tied embeddings counted once), instantiated on the meta device."""
    import torch

    model_cls, config = _config(name)
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    if sys.argv[1:] == ["--count"]:
        for name, expected in EXPECTED_PARAMS.items():
            n = count_parameters(name)
            print(f"{name}: {n:,} parameters ({n / 1e9:.3f}B; expected ~{expected / 1e9:.3f}B)")
    elif len(sys.argv) == 3 and sys.argv[1] in SHAPES:
        print(build(sys.argv[1], sys.argv[2]))
    else:
        sys.exit(f"usage: python -m benchmarks.gpu.llm_shapes {{{','.join(SHAPES)}}} FOLDER | --count")
