"""Host-made token ids copied into device memory before an embedding gathers them (nn/cuda_device_ids.h).

On CUDA `_core.cuda_ids_on_device` gives back the same ids (values, shape, dtype) for every integer dtype the
embeddings take and for shapes a prompt, a batch and a text encoder hand over; one id (a decode step's token, made on
the device) and non-integer arrays are left alone (None), as everything is off CUDA. An embedding then gathers the same
rows: a bfloat16 tiny Qwen3's prompt logits are the same bits with the copy and without it (MLXRUNNER_DEVICE_IDS=0,
a subprocess each), and the LLM and image parity tests run through it on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU, bf16_model_copy, run_script_json

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()
QWEN3 = Path(__file__).resolve().parents[1] / "fixtures" / "llm" / "qwen3-tiny"

LOGITS = r"""
import json, sys
import mlxrunner
from mlxrunner.llm import load

model = load(sys.argv[1])
print(json.dumps({"logits": [model.logits(list(range(3, 3 + n))).tolist() for n in (2, 9, 64)]}))
"""

CASES = [  # (shape, dtype)
    ((1, 64), mx.int32),  # a prompt's follow-up
    ((1, 512), mx.int32),  # a prefill chunk
    ((4, 1), mx.int32),  # a batch step's tokens
    ((3, 77), mx.uint32),
    ((1_000,), mx.int64),
    ((2,), mx.uint64),
]


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_ids_come_back_the_same(shape, dtype):
    values = np.random.default_rng(sum(shape)).integers(0, 151_936, size=shape)
    ids = mx.array(values).astype(dtype)
    out = _core.cuda_ids_on_device(ids)
    if not ON_CUDA:
        assert out is None
        return
    assert out.shape == ids.shape and out.dtype == ids.dtype
    assert np.array_equal(np.array(out), values)


def test_an_embedding_gathers_the_same_rows_from_copied_ids():
    table = mx.random.normal((1_000, 96), key=mx.random.key(3)).astype(mx.bfloat16)
    ids = mx.array(np.random.default_rng(5).integers(0, 1_000, size=(1, 64)).astype(np.int32))
    copied = _core.cuda_ids_on_device(ids)
    if not ON_CUDA:
        assert copied is None
        return
    assert np.array_equal(np.array(mx.take(table, copied, 0)), np.array(mx.take(table, ids, 0)))


@pytest.mark.parametrize("ids", [mx.array([7], mx.int32), mx.array([[1.0, 2.0]], mx.float32)],
                         ids=["one id", "floats"])
def test_one_id_and_non_integers_are_left_alone(ids):
    assert _core.cuda_ids_on_device(ids) is None


@pytest.mark.skipif(not ON_CUDA, reason="the copy is made on CUDA only")
def test_a_models_logits_are_the_same_bits_with_and_without_the_copy(tmp_path):
    model = str(bf16_model_copy(QWEN3, tmp_path / "qwen3-tiny-bf16"))
    copied = run_script_json(LOGITS, model, unset=["MLXRUNNER_DEVICE_IDS"])
    read_in_place = run_script_json(LOGITS, model, environment={"MLXRUNNER_DEVICE_IDS": "0"})
    assert copied == read_in_place
