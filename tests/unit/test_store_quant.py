"""Quantization metadata -> per-tensor QuantParams (docs/formats.md), and the load errors for bad input.

The formats: mlx-lm folders made by mlx-lm's own converter (tests/fixtures/llm-quant/, global
parameters, mixed per-module overrides, `false`), Ollama LLM stores as x/create writes them
(tests/ollama_store.py). Every bad input is an error naming the tensor and the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner.errors import ModelError
from mlxrunner.store import QuantParams, resolve
from ollama_store import create_llm, llm_tensor_quantization

FIXTURES = Path(__file__).parents[1] / "fixtures"
QUANT_FIXTURES = sorted(p for p in (FIXTURES / "llm-quant").iterdir() if p.is_dir())
QWEN3_Q4 = FIXTURES / "llm-quant" / "qwen3-tiny-q4-g64"
Q_PROJ = "model.layers.0.self_attn.q_proj"


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
    assert set(params) == packed and "model.embed_tokens.weight" in packed
    for name, value in params.items():
        assert value == expected_params(config, name.removesuffix(".weight")), name
    assert not any(name.endswith("norm.weight") for name in packed)


def test_mixed_recipe_keeps_its_per_module_bits():
    params = resolve(str(FIXTURES / "llm-quant" / "llama-tiny-mixed-3-6")).quantization()
    assert params["lm_head.weight"] == QuantParams(6, 64, "affine")
    assert params["model.layers.1.mlp.down_proj.weight"] == QuantParams(6, 64, "affine")
    assert params["model.layers.0.mlp.down_proj.weight"] == QuantParams(3, 64, "affine")


# -- a copy of an mlx-lm folder, edited --------------------------------------------------------


def edited_copy(tmp_path: Path, folder: Path = QWEN3_Q4, config=None, tensors=None) -> Path:
    """A copy of ``folder`` with ``config(config_dict)`` and ``tensors(tensor_dict)`` applied in place."""
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    (out / "model.safetensors.index.json").unlink()
    if config:
        data = json.loads((out / "config.json").read_text())
        config(data)
        (out / "config.json").write_text(json.dumps(data))
    if tensors:
        weights = mx.load(str(out / "model.safetensors"))
        tensors(weights)
        mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def set_override(module: str, value):
    def edit(config):
        config["quantization"][module] = value
    return edit


def quantization_error(folder: Path) -> str:
    with pytest.raises(ModelError) as error:
        resolve(str(folder)).quantization()
    return str(error.value)


def test_false_override_means_float(tmp_path):
    q = mx.random.normal((64, 64))

    def float_q_proj(weights):
        for suffix in ("scales", "biases"):
            del weights[f"{Q_PROJ}.{suffix}"]
        weights[f"{Q_PROJ}.weight"] = q

    folder = edited_copy(tmp_path, config=set_override(Q_PROJ, False), tensors=float_q_proj)
    source = resolve(str(folder))
    assert f"{Q_PROJ}.weight" not in source.quantization()
    assert source.tensors()[f"{Q_PROJ}.weight"].dtype == mx.float32


def test_false_override_on_a_packed_weight_is_an_error(tmp_path):
    message = quantization_error(edited_copy(tmp_path, config=set_override(Q_PROJ, False)))
    assert f"tensor '{Q_PROJ}.weight'" in message and "is false" in message


def test_a_mode_mlx_lacks_names_the_tensor(tmp_path):
    folder = edited_copy(tmp_path, config=set_override(Q_PROJ, {"group_size": 64, "bits": 4, "mode": "fp8"}))
    message = quantization_error(folder)
    assert f"tensor '{Q_PROJ}.weight'" in message and "mode 'fp8'" in message and "not one MLX has" in message


def test_three_bits_with_a_mode_that_forbids_them(tmp_path):
    # mxfp4 packs 8 values per word: 64 columns at 4 bits = 8 words, at 3 bits they would not fit.
    def edit(config):
        config["quantization"].update(bits=3, mode="mxfp4", group_size=32)
    message = quantization_error(edited_copy(tmp_path, FIXTURES / "llm-quant" / "qwen3-tiny-mxfp4", config=edit))
    assert "tensor 'model." in message and "mxfp4 quantization takes 4 bits, not 3" in message


def test_a_group_size_that_does_not_divide_the_columns(tmp_path):
    def three_groups(weights):  # 64 columns cannot be split into 3 groups
        weights[f"{Q_PROJ}.scales"] = mx.zeros((64, 3))
        weights[f"{Q_PROJ}.biases"] = mx.zeros((64, 3))
    message = quantization_error(edited_copy(tmp_path, tensors=three_groups))
    assert f"tensor '{Q_PROJ}.weight'" in message and "group size does not divide the columns" in message


def test_a_group_size_mlx_lacks(tmp_path):
    def sixteen(weights):  # affine with group size 16: MLX 0.32.4 refuses it
        weights[f"{Q_PROJ}.scales"] = mx.zeros((64, 4))
        weights[f"{Q_PROJ}.biases"] = mx.zeros((64, 4))
    folder = edited_copy(tmp_path, config=set_override(Q_PROJ, {"group_size": 16, "bits": 4}), tensors=sixteen)
    message = quantization_error(folder)
    assert f"tensor '{Q_PROJ}.weight'" in message and "takes group size 32, 64 or 128, not 16" in message


def test_a_truncated_scales_tensor(tmp_path):
    def truncate(weights):
        weights[f"{Q_PROJ}.scales"] = weights[f"{Q_PROJ}.scales"][:40]
    message = quantization_error(edited_copy(tmp_path, tensors=truncate))
    assert f"tensor '{Q_PROJ}.weight'" in message and "do not cover" in message and "truncated" in message


def test_a_truncated_biases_tensor(tmp_path):
    def truncate(weights):
        weights[f"{Q_PROJ}.biases"] = weights[f"{Q_PROJ}.biases"][:40]
    message = quantization_error(edited_copy(tmp_path, tensors=truncate))
    assert f"tensor '{Q_PROJ}.weight'" in message and "biases" in message and "truncated" in message


def test_affine_without_biases(tmp_path):
    def drop(weights):
        del weights[f"{Q_PROJ}.biases"]
    message = quantization_error(edited_copy(tmp_path, tensors=drop))
    assert f"tensor '{Q_PROJ}.weight'" in message and "needs biases" in message


def test_a_packed_weight_without_scales(tmp_path):
    def drop(weights):
        del weights[f"{Q_PROJ}.scales"], weights[f"{Q_PROJ}.biases"]
    message = quantization_error(edited_copy(tmp_path, tensors=drop))
    assert f"tensor '{Q_PROJ}.weight'" in message and "without scales" in message


def test_float_scales_with_a_microscaled_mode(tmp_path):
    def float_scales(weights):
        weights[f"{Q_PROJ}.scales"] = weights[f"{Q_PROJ}.scales"].astype(mx.float32)
    message = quantization_error(edited_copy(tmp_path, FIXTURES / "llm-quant" / "qwen3-tiny-mxfp8",
                                             tensors=float_scales))
    assert f"tensor '{Q_PROJ}.weight'" in message and "mxfp8 scales are U8" in message


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
