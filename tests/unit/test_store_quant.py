"""Quantization metadata -> per-tensor QuantParams (docs/formats.md), and the load errors for bad input.

The formats: mlx-lm folders made by mlx-lm's own converter (tests/fixtures/llm-quant/, global
parameters, mixed per-module overrides, `false`), Ollama LLM stores as x/create writes them
(tests/ollama_store.py). Every bad input is an error naming the tensor and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ollama_store import create_llm, llm_tensor_quantization
from quant_helpers import BAD_CASES, Q_PROJ, edited_copy, set_override

from mlxrunner.errors import ModelError
from mlxrunner.store import QuantParams, resolve

FIXTURES = Path(__file__).parents[1] / "fixtures"
QUANT_FIXTURES = sorted(p for p in (FIXTURES / "llm-quant").iterdir() if p.is_dir())
QWEN3_Q4 = FIXTURES / "llm-quant" / "qwen3-tiny-q4-g64"


def expected_params(config: dict, module: str) -> QuantParams | None:
    """What mlx-lm's own loader makes of a module: its override, else the global parameters."""
    quantization = config["quantization"]
    params = quantization.get(module, quantization)
    if params is False:
        return None
    return QuantParams(params["bits"], params["group_size"], params.get("mode", "affine"))


@pytest.mark.parametrize("folder", QUANT_FIXTURES, ids=[p.name for p in QUANT_FIXTURES])
def test_mlx_lm_folders_resolve_every_module_as_mlx_lm_does(folder):
    source = resolve(str(folder))
    config = json.loads((folder / "config.json").read_text())
    params = source.quantization()
    tensors = source.tensors()
    packed = {name for name, value in tensors.items() if value.dtype == mx.uint32}
    # (a multimodal Gemma 3 keeps its text model under language_model.)
    assert set(params) == packed and any(name.endswith("model.embed_tokens.weight") for name in packed)
    for name, value in params.items():
        assert value == expected_params(config, name.removesuffix(".weight")), name
    assert not any(name.endswith("norm.weight") for name in packed)


def test_mixed_recipe_keeps_its_per_module_bits():
    params = resolve(str(FIXTURES / "llm-quant" / "llama-tiny-mixed-3-6")).quantization()
    assert params["lm_head.weight"] == QuantParams(6, 64, "affine")
    assert params["model.layers.1.mlp.down_proj.weight"] == QuantParams(6, 64, "affine")
    assert params["model.layers.0.mlp.down_proj.weight"] == QuantParams(3, 64, "affine")


# -- load errors that name the tensor ---------------------------------------------------------


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_quantization_is_an_error_naming_the_tensor(tmp_path, case):
    bad = BAD_CASES[case]
    with pytest.raises(ModelError) as error:
        resolve(str(bad.build(tmp_path / "m"))).quantization()
    message = str(error.value)
    assert f"tensor '{bad.tensor}': " in message and all(e in message for e in bad.expected), message


def test_false_override_means_float(tmp_path):
    def float_q_proj(weights):
        del weights[f"{Q_PROJ}.scales"], weights[f"{Q_PROJ}.biases"]
        weights[f"{Q_PROJ}.weight"] = mx.random.normal((64, 64))

    folder = edited_copy(tmp_path / "m", QWEN3_Q4, set_override(Q_PROJ, False), float_q_proj)
    source = resolve(str(folder))
    assert f"{Q_PROJ}.weight" not in source.quantization()
    assert source.tensors()[f"{Q_PROJ}.weight"].dtype == mx.float32


# -- Ollama LLM stores (x/create) -------------------------------------------------------------


@pytest.mark.parametrize("quant_type, base, eight", [
    ("int4", QuantParams(4, 64, "affine"), QuantParams(8, 64, "affine")),
    ("int8", QuantParams(8, 64, "affine"), QuantParams(8, 64, "affine")),
    ("nvfp4", QuantParams(4, 16, "nvfp4"), QuantParams(8, 32, "mxfp8")),
    ("mxfp4", QuantParams(4, 32, "mxfp4"), QuantParams(8, 32, "mxfp8")),
    ("mxfp8", QuantParams(8, 32, "mxfp8"), QuantParams(8, 32, "mxfp8")),
])
def test_ollama_llm_store_per_tensor_types(tmp_path, quant_type, base, eight):
    """Embeddings and norms float, lm_head and v/k/down at the family's 8 bits, the rest at the base type."""
    folder = FIXTURES / "llm" / "llama-tiny"
    create_llm(tmp_path, "library/llama-tiny:" + quant_type, folder, quant_type)
    source = resolve("llama-tiny:" + quant_type, tmp_path)
    params = source.quantization()
    float_shapes = {k: v.shape for k, v in mx.load(str(folder / "model.safetensors")).items()}
    for name, shape in float_shapes.items():
        kind = llm_tensor_quantization(name, shape, quant_type)
        if not kind:
            assert name not in params, name
            continue
        promoted = ".v_proj" in name or ".k_proj" in name or "down_proj" in name or "lm_head" in name
        assert params[name] == (eight if promoted else base), name
    assert "model.embed_tokens.weight" not in params and "lm_head.weight" in params
    arrays = source.tensors()
    name = "model.layers.0.self_attn.q_proj.weight"
    p = params[name]
    restored = mx.dequantize(arrays[name], arrays[name + "_scale"], arrays.get(name + "_qbias"),
                             group_size=p.group_size, bits=p.bits, mode=p.mode, dtype=mx.float32)
    original = np.array(mx.load(str(folder / "model.safetensors"))[name])
    assert np.abs(np.array(restored) - original).max() < 0.5 * np.abs(original).max()
