"""LLM loading and generation in-process: folders, Ollama stores, options, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlxrunner.errors import ModelError
from mlxrunner.llm import load

FIXTURES = Path(__file__).parent / "fixtures" / "llm"
QWEN3 = FIXTURES / "qwen3-tiny"


@pytest.fixture(scope="module")
def qwen3():
    return load(str(QWEN3))


def test_ollama_store_copy_gives_the_same_logits(tmp_path, qwen3):
    from ollama_store import import_directory

    import_directory(tmp_path, "library/qwen3-tiny:latest", QWEN3)
    stored = load("qwen3-tiny", models_dir=str(tmp_path))
    ids = qwen3.tokenizer.encode("The store holds the same weights")
    np.testing.assert_array_equal(stored.logits(ids), qwen3.logits(ids))


def test_generate_honours_num_predict_and_is_seeded(qwen3):
    chunks = list(qwen3.generate("Hello", temperature=0.9, seed=3, num_predict=10))
    again = list(qwen3.generate("Hello", temperature=0.9, seed=3, num_predict=10))
    assert chunks == again
    final = list(qwen3.stream("Hello", _options(num_predict=10, temperature=0.9, seed=3)))[-1]
    assert final.eval_count <= 10 and final.prompt_eval_count == len(qwen3.tokenizer.encode("Hello"))


def test_prefill_in_chunks_gives_the_same_logits_as_one_pass(qwen3):
    ids = qwen3.tokenizer.encode("word " * 300)
    whole = np.array(qwen3.decoder.logits(ids, 4096))
    chunked = np.array(qwen3.decoder.logits(ids, 64))
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_is_named(tmp_path):
    shutil.copytree(QWEN3, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="unsupported LLM architecture \\['MambaForCausalLM'\\]"):
        load(str(tmp_path / "m"))


def test_a_missing_tensor_is_named(tmp_path):
    import mlx.core as mx

    shutil.copytree(QWEN3, tmp_path / "m")
    weights = mx.load(str(tmp_path / "m" / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(tmp_path / "m" / "model.safetensors"), weights)
    with pytest.raises(ModelError, match="missing weight model.layers.1.mlp.up_proj.weight"):
        load(str(tmp_path / "m"))


def test_out_of_vocabulary_prompt_ids_are_refused(qwen3):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(qwen3.generate([1, 2, 10**6], num_predict=1))


def _options(**kw):
    from mlxrunner.protocol import Limits, parse_options

    return parse_options(kw, Limits())
