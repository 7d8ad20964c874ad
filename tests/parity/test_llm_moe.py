"""Mixture-of-experts and latent-attention decoders beyond the transformers goldens (test_llm_parity.py):
every spelling checkpoints give the experts and the config, both attention paths of MLA, both expert paths
(tokens sorted by expert or not), and config errors. Real folders rewritten with MLX, no torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest
from conftest import float32_tol

from mlxrunner import _core
from mlxrunner.errors import ModelError
from mlxrunner.llm import load

FIXTURES = Path(__file__).parents[1] / "fixtures" / "llm"
QWEN3_MOE = FIXTURES / "qwen3-moe-tiny"
GLM = FIXTURES / "glm4-moe-lite-tiny"
GPT_OSS = FIXTURES / "gpt-oss-tiny"
GPT_OSS_MXFP4 = FIXTURES / "gpt-oss-tiny-mxfp4"
TOL = float32_tol(1e-4, 1e-2)
PROMPT = "The quick brown fox jumps over the lazy dog, then naps under the old oak tree by the river."


@pytest.fixture(scope="module")
def qwen3_moe():
    return load(str(QWEN3_MOE))


@pytest.fixture(scope="module")
def glm():
    return load(str(GLM))


@pytest.fixture(scope="module")
def gpt_oss():
    return load(str(GPT_OSS))


def rewritten(source: Path, out: Path, weights: Callable[[dict], dict] = lambda w: w,
              config: Callable[[dict], dict] = lambda c: c) -> Path:
    """A copy of `source` with its tensors and config.json passed through the given functions."""
    shutil.copytree(source, out)
    tensors = mx.load(str(out / "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"), weights(dict(tensors)))
    (out / "config.json").write_text(json.dumps(config(json.loads((out / "config.json").read_text()))))
    return out


def per_expert(tensors: dict, layer: int, proj: str, experts: int) -> list[mx.array]:
    return [tensors.pop(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight") for e in range(experts)]


def moe_layers(tensors: dict) -> list[int]:
    return sorted({int(k.split(".")[2]) for k in tensors if ".mlp.experts.0.gate_proj.weight" in k})


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_mlx_lm_stacked_experts_and_the_hub_expert_count(tmp_path, qwen3_moe):
    """mlx-lm's switch_mlp.{gate,up,down}_proj [E, out, in]; the Hub's `num_experts` key."""
    def stack(tensors):
        for layer in moe_layers(tensors):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                tensors[f"model.layers.{layer}.mlp.switch_mlp.{proj}.weight"] = mx.stack(
                    per_expert(tensors, layer, proj, 8))
        return tensors

    def hub_config(config):
        config["num_experts"] = config.pop("num_local_experts")
        return config

    folder = rewritten(QWEN3_MOE, tmp_path / "m", stack, hub_config)
    ids = qwen3_moe.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(load(str(folder)).logits(ids), qwen3_moe.logits(ids))


def test_transformers_fused_experts(tmp_path, qwen3_moe):
    """transformers 5's in-memory layout: experts.gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
    def fuse(tensors):
        for layer in moe_layers(tensors):
            gate, up = per_expert(tensors, layer, "gate_proj", 8), per_expert(tensors, layer, "up_proj", 8)
            prefix = f"model.layers.{layer}.mlp.experts"
            tensors[f"{prefix}.gate_up_proj"] = mx.stack([mx.concatenate([g, u]) for g, u in zip(gate, up)])
            tensors[f"{prefix}.down_proj"] = mx.stack(per_expert(tensors, layer, "down_proj", 8))
        return tensors

    folder = rewritten(QWEN3_MOE, tmp_path / "m", fuse)
    ids = qwen3_moe.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(load(str(folder)).logits(ids), qwen3_moe.logits(ids))


def test_mlp_only_layers_are_dense(tmp_path, qwen3_moe):
    """Layer 1 of the fixture is listed in mlp_only_layers: a dense MLP, which the loader must read as such."""
    assert json.loads((QWEN3_MOE / "config.json").read_text())["mlp_only_layers"] == [1]
    folder = rewritten(QWEN3_MOE, tmp_path / "m", config=lambda c: {**c, "mlp_only_layers": []})
    with pytest.raises(ModelError, match=r"missing weight model\.layers\.1\.mlp\.gate\.weight"):
        load(str(folder))


def test_sorted_and_unsorted_expert_paths_agree(qwen3_moe):
    """Chunks of 64+ (token, expert) pairs run sorted by expert; small chunks (and decoding) unsorted."""
    ids = qwen3_moe.tokenizer.encode(PROMPT * 3)
    assert len(ids) * 2 >= 64
    sorted_run = np.array(qwen3_moe.decoder.logits(ids, 512))
    unsorted_run = np.array(qwen3_moe.decoder.logits(ids, 8))
    assert relative_error(unsorted_run, sorted_run) <= TOL


def test_absorbed_decoding_matches_expanded_prefill(glm):
    """One token at a time attends in latent space (absorbed); a chunk expands keys and values per head."""
    ids = glm.tokenizer.encode(PROMPT)
    expanded = np.array(glm.decoder.logits(ids, 512))
    absorbed = np.array(glm.decoder.logits(ids, 1))
    assert relative_error(absorbed, expanded) <= TOL


def test_glm_hub_config_spelling(tmp_path, glm):
    """The Hub's GLM-4.7-Flash config says first_k_dense_replace where transformers 5 lists mlp_layer_types."""
    def hub_config(config):
        del config["mlp_layer_types"]
        return {**config, "first_k_dense_replace": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}

    folder = rewritten(GLM, tmp_path / "m", config=hub_config)
    ids = glm.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(load(str(folder)).logits(ids), glm.logits(ids))


def test_glm_router_bias_is_required(tmp_path):
    def drop_bias(tensors):
        del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
        return tensors

    with pytest.raises(ModelError, match=r"missing weight model\.layers\.1\.mlp\.gate\.e_score_correction_bias"):
        load(str(rewritten(GLM, tmp_path / "m", drop_bias)))


@pytest.mark.parametrize(("source", "change", "named"), [
    (QWEN3_MOE, {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    (GLM, {"n_group": 3}, "n_group"),
    (GLM, {"topk_group": 3}, "topk_group"),
    (GLM, {"kv_lora_rank": 0}, "kv_lora_rank"),
    (GLM, {"mlp_layer_types": ["dense", "sparse"]}, "mlp_layer_types"),
])
def test_bad_moe_config_is_named(tmp_path, source, change, named):
    folder = rewritten(source, tmp_path / "m", config=lambda c: {**c, **change})
    with pytest.raises(ModelError, match=named):
        load(str(folder))


def test_glm_from_an_ollama_store(tmp_path, glm):
    """As x/create stores it: each layer's experts and shared experts in one packed blob. Quantized stores
    are compared with their dequantized weights in test_llm_quant_parity.py; here the packing itself."""
    from ollama_store import create_llm

    from mlxrunner.store import resolve

    create_llm(tmp_path, "library/glm-tiny:latest", GLM)
    ids = glm.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(load("glm-tiny", models_dir=str(tmp_path)).logits(ids), glm.logits(ids))

    create_llm(tmp_path, "library/glm-tiny:int4", GLM, "int4")
    packed = resolve("glm-tiny:int4", str(tmp_path)).quantization()
    assert packed["model.layers.1.mlp.experts.7.gate_proj.weight"].bits == 4
    assert packed["model.layers.2.mlp.shared_experts.up_proj.weight"].bits == 4


def test_glm_streams_transformers_greedy_text(glm):
    """The whole generation path (prompt text -> streamed text) on GLM, the seed runner's one LLM."""
    goldens = json.loads((Path(__file__).parents[1] / "goldens" / "llm_glm4-moe-lite-tiny.json").read_text())
    prompt = next(p for p in goldens["prompts"] if p["id"] == "chat")
    greedy = next(g for g in goldens["greedy"] if g["prompt_id"] == "chat")
    text = "".join(glm.generate(prompt["text"], temperature=0, repeat_penalty=1, num_predict=len(greedy["new_ids"])))
    assert text == glm.tokenizer.decode(greedy["new_ids"])


def test_gpt_oss_in_mlx_lm_layout(tmp_path, gpt_oss):
    """mlx-lm's GPT-OSS (its sanitize output): experts.{gate,up,down}_proj.{weight,bias} [E, out, in], from
    transformers' gate_up_proj [E, H, 2I] (even columns gate, odd up) and down_proj [E, I, H]."""
    def mlx_lm_layout(tensors):
        for name in [k for k in tensors if k.endswith(".mlp.experts.gate_up_proj")]:
            prefix = name.removesuffix("gate_up_proj")
            gate_up, bias = tensors.pop(name).swapaxes(1, 2), tensors.pop(prefix + "gate_up_proj_bias")
            tensors[prefix + "gate_proj.weight"], tensors[prefix + "up_proj.weight"] = gate_up[:, ::2], gate_up[:, 1::2]
            tensors[prefix + "gate_proj.bias"], tensors[prefix + "up_proj.bias"] = bias[:, ::2], bias[:, 1::2]
            tensors[prefix + "down_proj.weight"] = tensors.pop(prefix + "down_proj").swapaxes(1, 2)
            tensors[prefix + "down_proj.bias"] = tensors.pop(prefix + "down_proj_bias")
        return tensors

    folder = rewritten(GPT_OSS, tmp_path / "m", mlx_lm_layout)
    ids = gpt_oss.tokenizer.encode(PROMPT)
    np.testing.assert_allclose(load(str(folder)).logits(ids), gpt_oss.logits(ids), rtol=0, atol=1e-5)


def test_gpt_oss_swiglu_limit_is_read(tmp_path, gpt_oss):
    """The fixture's limit of 3 clamps (its goldens hold only with it); GptOssConfig's default 7 gives others."""
    assert json.loads((GPT_OSS / "config.json").read_text())["swiglu_limit"] == 3.0
    folder = rewritten(GPT_OSS, tmp_path / "m", config=lambda c: {k: v for k, v in c.items() if k != "swiglu_limit"})
    ids = gpt_oss.tokenizer.encode(PROMPT)
    assert relative_error(load(str(folder)).logits(ids), gpt_oss.logits(ids)) > 1e-3


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.sinks", "model.layers.1.mlp.router.bias",
                                  "model.layers.0.mlp.experts.down_proj_bias"])
def test_gpt_oss_weights_are_required(tmp_path, name):
    def drop(tensors):
        del tensors[name]
        return tensors

    with pytest.raises(ModelError, match=rf"missing weight {name.replace('.', chr(92) + '.')}"):
        load(str(rewritten(GPT_OSS, tmp_path / "m", drop)))


def test_gpt_oss_mxfp4_experts_are_transformers_dequantized_weights():
    """GPT-OSS's MXFP4 experts (*_blocks, *_scales) load as MLX mxfp4 weights, repacked, not dequantized;
    MLX's dequantization of them is bit for bit what transformers dequantizes the checkpoint to (goldens:
    the SHA-256 of its float32 [E, in, out] experts). The greedy and logit goldens of the whole model are
    in test_llm_parity.py."""
    goldens = json.loads((Path(__file__).parents[1] / "goldens" / "llm_gpt-oss-tiny-mxfp4.json").read_text())
    tensors = mx.load(str(GPT_OSS_MXFP4 / "model.safetensors"))
    assert len(goldens["dequantized_experts"]) == 4
    for name, ref in goldens["dequantized_experts"].items():
        weight, scales = _core.mxfp4_blocks(tensors[name + "_blocks"], tensors[name + "_scales"])
        if scales is None:  # a CUDA kernel lacks the shape: the loader dequantized it
            ours = weight
        else:
            assert weight.dtype == mx.uint32 and scales.dtype == mx.uint8
            assert weight.shape[-1] * 8 == scales.shape[-1] * 32  # 4 bits, groups of 32: still packed
            ours = mx.dequantize(weight, scales, group_size=32, bits=4, mode="mxfp4")
        ours = np.ascontiguousarray(np.swapaxes(np.array(ours.astype(mx.float32)), 1, 2))
        assert list(ours.shape) == ref["shape"], name
        assert ours.reshape(-1)[:8].tolist() == ref["first"], name
        assert hashlib.sha256(ours.tobytes()).hexdigest() == ref["sha256"], name


def test_gpt_oss_mxfp4_blocks_must_be_bytes(tmp_path):
    def as_float(tensors):
        name = "model.layers.0.mlp.experts.down_proj_scales"
        tensors[name] = tensors[name].astype(mx.float32)
        return tensors

    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.experts\.down_proj_scales must be uint8"):
        load(str(rewritten(GPT_OSS_MXFP4, tmp_path / "m", as_float)))


def test_gpt_oss_from_an_ollama_store(tmp_path, gpt_oss):
    """As x/create stores it: each layer's fused experts and their biases in one packed blob, everything else a
    layer of its own. Quantized stores: test_llm_quant_parity.py."""
    from ollama_store import create_llm

    create_llm(tmp_path, "library/gpt-oss-tiny:latest", GPT_OSS)
    ids = gpt_oss.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(load("gpt-oss-tiny", models_dir=str(tmp_path)).logits(ids), gpt_oss.logits(ids))
