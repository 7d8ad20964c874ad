"""LLM loading and generation in-process: folders, Ollama stores, options, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import float32_tol

from mlxrunner.errors import ModelError
from mlxrunner.llm import load

FIXTURES = Path(__file__).parents[1] / "fixtures" / "llm"
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
    np.testing.assert_allclose(chunked, whole, rtol=float32_tol(1e-4, 1e-2), atol=float32_tol(1e-4, 1e-1))


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
    from mlxrunner.request import Limits, parse_options

    return parse_options(kw, Limits())


def test_hidden_states_number_layers_as_transformers(qwen3):
    """The last hidden state is the final norm's output: times the tied embedding it gives the logits."""
    import mlx.core as mx
    from safetensors.numpy import load_file

    ids = qwen3.tokenizer.encode("hidden states for the text encoder")
    layers = qwen3.core_config.num_hidden_layers
    states = qwen3.decoder.hidden_states(mx.array([ids], mx.int32), None, [0, 1, layers])
    embed = load_file(str(QWEN3 / "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_allclose(np.array(states[0])[0], embed[ids], rtol=1e-6)
    logits = np.array(states[2])[0] @ embed.T
    np.testing.assert_allclose(logits, qwen3.logits(ids), rtol=float32_tol(1e-4, 1e-2),
                               atol=float32_tol(1e-4, 1e-1))


def test_hidden_states_with_a_padding_mask_match_the_unpadded_run(qwen3):
    import mlx.core as mx

    short = qwen3.tokenizer.encode("short one")
    long = qwen3.tokenizer.encode("a longer prompt than the other")
    pad = qwen3.tokenizer.pad_id or 0
    batch = mx.array([short + [pad] * (len(long) - len(short)), long], mx.int32)
    mask = mx.array([[1] * len(short) + [0] * (len(long) - len(short)), [1] * len(long)], mx.int32)
    (padded,) = qwen3.decoder.hidden_states(batch, mask, [2])
    (alone,) = qwen3.decoder.hidden_states(mx.array([short], mx.int32), None, [2])
    np.testing.assert_allclose(np.array(padded)[0, : len(short)], np.array(alone)[0], rtol=1e-4, atol=1e-5)


def test_a_right_padded_prompt_alone_is_its_row_of_a_padded_batch_pads_included(qwen3):
    # One right-padded row (FLUX.2's text encoder: a prompt padded to 512, every state fed on) takes the CPU's split
    # attention (real tokens causal, pads over the real tokens); in a batch the same row takes the masked square.
    import mlx.core as mx

    short = qwen3.tokenizer.encode("short one")
    long = qwen3.tokenizer.encode("a longer prompt than the other one, with a few more words in it")
    pad = qwen3.tokenizer.pad_id or 0
    padded_short = short + [pad] * (len(long) - len(short))
    short_mask = [1] * len(short) + [0] * (len(long) - len(short))
    layers = [1, qwen3.core_config.num_hidden_layers]
    alone = qwen3.decoder.hidden_states(mx.array([padded_short], mx.int32), mx.array([short_mask], mx.int32), layers)
    batch = mx.array([padded_short, long], mx.int32)
    in_batch = qwen3.decoder.hidden_states(batch, mx.array([short_mask, [1] * len(long)], mx.int32), layers)
    assert len(long) > 2 * len(short)
    for one, of_batch in zip(alone, in_batch):
        np.testing.assert_allclose(np.array(one)[0], np.array(of_batch)[0], rtol=1e-4, atol=1e-5)
