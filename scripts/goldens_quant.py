#!/usr/bin/env python3
"""Quantized tiny LLMs made by mlx-lm's own converter, and mlx-lm's outputs on them.

The tests compare our C++ decoder on these folders with what mlx-lm itself generates from the same
folder; they run without mlx-lm, from the recorded goldens. Run from the repository root in the side
venv (``python3 -m venv .ref && .ref/bin/pip install "mlx[cpu]==0.32.4" mlx-lm==0.32.2``):

    .ref/bin/python scripts/goldens_quant.py fixtures [NAME ...]  # tests/fixtures/llm-quant/<name>/
    .ref/bin/python scripts/goldens_quant.py goldens    # tests/goldens/mlx_lm_quant.json
    .ref/bin/python scripts/goldens_quant.py check-folder DIR EXPECTED.json  # see check_folder()

``fixtures`` quantizes the float fixtures of tests/fixtures/llm/ with ``mlx_lm.convert``. Their
config.json gets the top-level ``rope_theta`` / ``rope_scaling`` beside transformers 5's
``rope_parameters`` first: mlx-lm 0.32.2's Llama reads only the top-level keys and would otherwise run
another model (theta 1e4, no llama3 scaling); a Qwen3-MoE config gets the Hub's ``num_experts`` too.
GPT-OSS's experts are first rewritten into mlx-lm's own layout (what its ``sanitize`` makes of OpenAI's
checkpoints: mlx-lm 0.32.2 would misread transformers' transposed ``gate_up_proj``), and its config made to
say what mlx-lm runs whatever it says: YaRN with ``truncate: true`` (transformers' GPT-OSS does not round
the blend band) and the SwiGLU clamp at GPT-OSS's own 7 (mlx-lm does not read ``swiglu_limit``).
``goldens`` records, per fixture, mlx-lm's token ids of
each prompt, its greedy continuation (argmax, no penalties) with the top1-top2 logit margin of each
step, and the last-position logits of one prompt. Deterministic: re-running gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
FLOAT_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "llm"
QUANT_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "llm-quant"
GOLDENS = REPO_ROOT / "tests" / "goldens" / "mlx_lm_quant.json"

# recipe -> mlx_lm.convert's quantization arguments
RECIPES: dict[str, dict] = {
    "q4-g64": dict(q_bits=4, q_group_size=64),
    "q8-g32": dict(q_bits=8, q_group_size=32),
    "mixed-3-6": dict(q_group_size=64, quant_predicate="mixed_3_6"),
    "mxfp4": dict(q_mode="mxfp4"),
    "nvfp4": dict(q_mode="nvfp4"),
    "mxfp8": dict(q_mode="mxfp8"),
}
# name -> (float source in tests/fixtures/llm/, recipe). qwen3-tiny: tied head, Qwen3's q/k norms.
# llama3-tiny: tied head, GQA, llama3 rope scaling (the mlx-lm pitfall). llama-tiny: an untied lm_head,
# which the mixed recipe gives the high bits. gemma3-vlm-tiny: Gemma 3 in the Hub's layout (mlx-lm reads
# only its sliding_window_pattern spelling), sliding windows of 8, a packed tied embedding.
FIXTURES: dict[str, tuple[str, dict]] = {
    **{f"qwen3-tiny-{r}": ("qwen3-tiny", args) for r, args in RECIPES.items()},
    **{f"llama3-tiny-{r}": ("llama3-tiny", args) for r, args in RECIPES.items()},
    "llama-tiny-q4-g64": ("llama-tiny", RECIPES["q4-g64"]),
    "llama-tiny-mixed-3-6": ("llama-tiny", RECIPES["mixed-3-6"]),
    # Qwen3-MoE: mlx-lm stacks the experts into switch_mlp.{gate,up,down}_proj [E, out, in], packed.
    "qwen3-moe-tiny-q4-g64": ("qwen3-moe-tiny", RECIPES["q4-g64"]),
    # GLM-4.7-Flash: mlx-lm splits kv_b_proj into per-head embed_q / unembed_out (MLA's absorbed form).
    "glm4-moe-lite-tiny-q8-g32": ("glm4-moe-lite-tiny", RECIPES["q8-g32"]),
    "gemma3-vlm-tiny-q4-g64": ("gemma3-vlm-tiny", RECIPES["q4-g64"]),
    "gemma3-vlm-tiny-mxfp4": ("gemma3-vlm-tiny", RECIPES["mxfp4"]),
    # GPT-OSS in mlx-lm's layout: stacked biased experts experts.{gate,up,down}_proj, as mlx-lm quantizes
    # it (its quant_predicate keeps the router at 8 bits, group 64, affine).
    "gpt-oss-tiny-mxfp4": ("gpt-oss-tiny", RECIPES["mxfp4"]),
    "gpt-oss-tiny-q4-g64": ("gpt-oss-tiny", RECIPES["q4-g64"]),
}

PROMPTS = {
    "short": "The quick brown fox jumps over the lazy dog.",
    "unicode": "Crème brûlée à Paris, Grüße aus München! 東京で寿司を食べた 🍣🎉",
    "code": "def add(a, b):\n    return a + b\n",
    # Longer than a 512-token prefill chunk: the runner prefills in chunks, mlx-lm in one.
    "long": " ".join(f"Line {i}: the history of computing spans many centuries." for i in range(14)),
}
NEW_TOKENS = 24
LOGITS_PROMPT = "short"


# -- fixtures -----------------------------------------------------------------------------------


def with_both_rope_forms(config: dict) -> dict:
    """Add top-level rope_theta / rope_scaling from transformers 5's rope_parameters (same model); and for a
    multimodal Gemma 3 the top-level vocab_size mlx-lm 0.32.2 reads (else 262208) instead of text_config's."""
    rope = dict(config.get("rope_parameters") or {})
    config = dict(config)
    if "text_config" in config:
        config["vocab_size"] = config["text_config"]["vocab_size"]
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def with_hub_expert_count(config: dict) -> dict:
    """Add the Hub's num_experts beside transformers 5's num_local_experts: mlx-lm reads only the former."""
    if "num_local_experts" in config and "num_experts" not in config:
        return {**config, "num_experts": config["num_local_experts"]}
    return config


def as_mlx_lm_runs_gpt_oss(config: dict) -> dict:
    """mlx-lm 0.32.2's GPT-OSS rounds YaRN's blend band outwards and clamps its SwiGLU at 7 (alpha 1.702)
    whatever the config says: say so."""
    config = {**config, "swiglu_limit": 7.0, "swiglu_alpha": 1.702}
    for key in ("rope_scaling", "rope_parameters"):
        if (config.get(key) or {}).get("rope_type") == "yarn":
            config = {**config, key: {**config[key], "truncate": True}}
    return config


def to_mlx_lm_gpt_oss_experts(path: Path) -> None:
    """transformers' GPT-OSS experts (gate_up_proj [E, H, 2I], gate and up interleaved; down_proj [E, I, H])
    -> mlx-lm's: experts.{gate,up,down}_proj.{weight,bias}, weights [E, out, in]."""
    tensors = mx.load(str(path))
    for name in [k for k in tensors if k.endswith(".mlp.experts.gate_up_proj")]:
        prefix = name.removesuffix("gate_up_proj")
        gate_up, bias = tensors.pop(name).swapaxes(1, 2), tensors.pop(prefix + "gate_up_proj_bias")
        tensors[prefix + "gate_proj.weight"], tensors[prefix + "up_proj.weight"] = gate_up[:, ::2], gate_up[:, 1::2]
        tensors[prefix + "gate_proj.bias"], tensors[prefix + "up_proj.bias"] = bias[:, ::2], bias[:, 1::2]
        tensors[prefix + "down_proj.weight"] = tensors.pop(prefix + "down_proj").swapaxes(1, 2)
        tensors[prefix + "down_proj.bias"] = tensors.pop(prefix + "down_proj_bias")
    mx.save_safetensors(str(path), {k: mx.contiguous(v) for k, v in tensors.items()}, metadata={"format": "mlx"})


def make_fixture(name: str, source: str, convert_args: dict) -> Path:
    from mlx_lm import convert

    out = QUANT_FIXTURES / name
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / source
        shutil.copytree(FLOAT_FIXTURES / source, src)
        config = json.loads((src / "config.json").read_text())
        config = with_hub_expert_count(with_both_rope_forms(config))
        if config["architectures"] == ["GptOssForCausalLM"]:
            config = as_mlx_lm_runs_gpt_oss(config)
            to_mlx_lm_gpt_oss_experts(src / "model.safetensors")
        (src / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        convert(str(src), str(out), quantize=True, **convert_args)
    (out / "README.md").unlink(missing_ok=True)  # mlx-lm's model card: nothing a test reads
    return out


# -- goldens ------------------------------------------------------------------------------------


def greedy_with_margins(model, ids: list[int], count: int) -> tuple[list[int], list[float]]:
    """mlx-lm's greedy continuation (its default sampler is argmax) and each step's top1-top2 gap."""
    from mlx_lm.generate import generate_step

    tokens, margins = [], []
    for token, logprobs in generate_step(mx.array(ids), model, max_tokens=count):
        top2 = np.sort(np.array(logprobs.astype(mx.float32)))[-2:]
        tokens.append(int(token))
        margins.append(round(float(top2[1] - top2[0]), 6))
    return tokens, margins


def last_logits(model, ids: list[int]) -> list[float]:
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    return [float(np.format_float_positional(x, unique=True, trim="-")) for x in np.array(logits)]


def record_folder(folder: Path) -> dict:
    """What mlx-lm does with one quantized folder."""
    from mlx_lm import load

    model, tokenizer = load(str(folder))
    prompts = []
    for prompt_id, text in PROMPTS.items():
        ids = tokenizer.encode(text)
        new_ids, margins = greedy_with_margins(model, ids, NEW_TOKENS)
        prompts.append({"id": prompt_id, "text": text, "input_ids": ids, "new_ids": new_ids,
                        "top2_margins": margins})
    logits_ids = next(p["input_ids"] for p in prompts if p["id"] == LOGITS_PROMPT)
    return {"eos_ids": sorted(tokenizer.eos_token_ids), "prompts": prompts,
            "last_logits": {"prompt_id": LOGITS_PROMPT, "values": last_logits(model, logits_ids)}}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_goldens() -> Path:
    versions = {name: metadata.version(name) for name in ("mlx", "mlx-lm", "transformers", "numpy")}
    versions["python"] = platform.python_version()
    cases = {}
    for name, (source, convert_args) in FIXTURES.items():
        folder = QUANT_FIXTURES / name
        config = json.loads((folder / "config.json").read_text())
        cases[name] = {
            "model": str(folder.relative_to(REPO_ROOT)),
            "source": str((FLOAT_FIXTURES / source).relative_to(REPO_ROOT)),
            "convert_args": convert_args,
            "quantization": {k: v for k, v in config["quantization"].items() if not isinstance(v, dict)},
            "sha256": {f.name: sha256(f) for f in sorted(folder.iterdir()) if f.is_file()},
            **record_folder(folder),
        }
        print(f"{name}: {[p['new_ids'][:6] for p in cases[name]['prompts']]}", file=sys.stderr)
    goldens = {"generator": "scripts/goldens_quant.py goldens", "new_tokens": NEW_TOKENS,
               "metadata": {"versions": versions, "device": "cpu", "sampler": "argmax, no penalties"},
               "fixtures": cases}
    GOLDENS.write_text(one_fixture_per_line(goldens))
    return GOLDENS


def one_fixture_per_line(goldens: dict) -> str:
    """Readable diffs without a line per number: the header indented, each fixture's case on one line."""
    cases = goldens["fixtures"]
    header = json.dumps({**goldens, "fixtures": {}}, ensure_ascii=False, indent=1)[:-len('{}\n}')]
    lines = [f" {json.dumps(name)}: {json.dumps(case, ensure_ascii=False, separators=(',', ':'))}"
             for name, case in cases.items()]
    return header + "{\n" + ",\n".join(lines) + "\n }\n}\n"


def check_folder(folder: Path, expected: Path) -> int:
    """mlx-lm loads ``folder`` (e.g. ``mlxrunner quantize`` output) and must generate the greedy ids in
    ``expected`` (a JSON list of {"input_ids", "new_ids"}, e.g. from our runner). Exit 1 on a mismatch."""
    from mlx_lm import load

    model, _ = load(str(folder))
    failures = 0
    for case in json.loads(expected.read_text()):
        ours, _ = greedy_with_margins(model, case["input_ids"], len(case["new_ids"]))
        same = ours == case["new_ids"]
        failures += not same
        print(f"{'same' if same else 'DIFFERENT'}: mlx-lm {ours} vs expected {case['new_ids']}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fixtures = sub.add_parser("fixtures", help="quantize the float fixtures with mlx_lm.convert")
    fixtures.add_argument("names", nargs="*", help="only these fixtures (default: all)")
    sub.add_parser("goldens", help="record mlx-lm's outputs on the quantized fixtures")
    check = sub.add_parser("check-folder", help="mlx-lm on a folder must generate the given ids")
    check.add_argument("folder", type=Path)
    check.add_argument("expected", type=Path)
    args = parser.parse_args(argv)
    if args.command == "fixtures":
        for name in args.names or FIXTURES:
            print(make_fixture(name, *FIXTURES[name]), file=sys.stderr)
    elif args.command == "goldens":
        print(record_goldens(), file=sys.stderr)
    else:
        return check_folder(args.folder, args.expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
