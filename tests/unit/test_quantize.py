"""`mlxrunner quantize`: a float LLM -> an mlx-lm folder, the same bytes mlx-lm's own converter writes.

tests/fixtures/llm-quant/ holds mlx_lm.convert's output for the same float sources and recipes
(scripts/goldens_quant.py), so equal tensors mean mlx-lm loads ours exactly as it loads its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from ollama_store import create_llm

from mlxrunner.cli.quantize import main
from mlxrunner.store import QuantParams, resolve

FIXTURES = Path(__file__).parents[1] / "fixtures"
RECIPES = {"q4-g64": ["--bits", "4", "--group-size", "64"], "q8-g32": ["--bits", "8", "--group-size", "32"],
           "mxfp4": ["--bits", "4", "--mode", "mxfp4"], "nvfp4": ["--bits", "4", "--mode", "nvfp4"],
           "mxfp8": ["--bits", "8", "--mode", "mxfp8"]}
CASES = [(model, recipe) for model in ("qwen3-tiny", "llama3-tiny") for recipe in RECIPES] + [("llama-tiny", "q4-g64")]


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = mx.load(str(ours / "model.safetensors")), mx.load(str(theirs / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]).item(), name


@pytest.mark.parametrize("model, recipe", CASES, ids=[f"{m}-{r}" for m, r in CASES])
def test_output_is_what_mlx_lm_convert_writes(tmp_path, model, recipe):
    assert main([str(FIXTURES / "llm" / model), str(tmp_path / "out"), *RECIPES[recipe]]) == 0
    theirs = FIXTURES / "llm-quant" / f"{model}-{recipe}"
    assert_same_tensors(tmp_path / "out", theirs)
    ours_config = json.loads((tmp_path / "out" / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    assert ours_config["quantization"] == ours_config["quantization_config"] == their_config["quantization"]
    assert {k: v for k, v in ours_config.items() if k != "eos_token_id"} == \
        {k: v for k, v in their_config.items() if k != "eos_token_id"}  # mlx-lm copies generation_config's EOS
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"].keys() == \
        json.loads((theirs / "model.safetensors.index.json").read_text())["weight_map"].keys()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (FIXTURES / "llm" / model / name).read_bytes()


def test_mixed_affine_is_mlx_lm_mixed_4_6(tmp_path):
    assert main([str(FIXTURES / "llm" / "llama-tiny"), str(tmp_path / "out"), "--bits", "4", "--mixed"]) == 0
    params = resolve(str(tmp_path / "out")).quantization()
    six, four = QuantParams(6, 64, "affine"), QuantParams(4, 64, "affine")
    # 2 layers: the last eighth is layer 1, so its v_proj and down_proj get 6 bits; lm_head always.
    assert params["lm_head.weight"] == six
    assert params["model.layers.1.self_attn.v_proj.weight"] == params["model.layers.1.mlp.down_proj.weight"] == six
    assert params["model.layers.0.self_attn.v_proj.weight"] == params["model.embed_tokens.weight"] == four
    quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert quantization["lm_head"] == {"group_size": 64, "bits": 6, "mode": "affine"}
    assert len([k for k, v in quantization.items() if isinstance(v, dict)]) == len(params)


def test_mixed_fp4_promotes_to_mxfp8(tmp_path):
    assert main([str(FIXTURES / "llm" / "llama-tiny"), str(tmp_path / "out"), "--bits", "4", "--mode", "nvfp4",
                 "--mixed"]) == 0
    params = resolve(str(tmp_path / "out")).quantization()
    assert params["lm_head.weight"] == params["model.layers.1.mlp.down_proj.weight"] == QuantParams(8, 32, "mxfp8")
    assert params["model.layers.0.mlp.down_proj.weight"] == QuantParams(4, 16, "nvfp4")


def test_an_ollama_store_is_a_source_too(tmp_path):
    create_llm(tmp_path / "models", "library/qwen3-tiny:latest", FIXTURES / "llm" / "qwen3-tiny")
    assert main(["qwen3-tiny", str(tmp_path / "out"), "--bits", "4", "--models-dir", str(tmp_path / "models")]) == 0
    assert_same_tensors(tmp_path / "out", FIXTURES / "llm-quant" / "qwen3-tiny-q4-g64")


@pytest.mark.parametrize("args, message", [
    (["--bits", "4", "--mode", "mxfp8"], "mxfp8 quantization takes 8 bits, not 4"),
    (["--bits", "4", "--group-size", "48"], "affine quantization takes group size 32, 64 or 128, not 48"),
    (["--bits", "8", "--mixed"], "at 8 bits there are none more"),
])
def test_bad_choices_exit_1_with_the_reason(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "mlxrunner", "quantize", str(FIXTURES / "llm" / "qwen3-tiny"),
                           str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ") and message in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, message", [
    (FIXTURES / "llm-quant" / "qwen3-tiny-q4-g64", "is quantized already"),
    ("all-minilm", "handles LLMs"),
])
def test_sources_it_refuses(tmp_path, capsys, source, message):
    assert main([str(source), str(tmp_path / "out"), "--bits", "4"]) == 1
    assert message in capsys.readouterr().err


def test_a_destination_with_files_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main([str(FIXTURES / "llm" / "qwen3-tiny"), str(tmp_path / "out"), "--bits", "4"]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
