"""YaRN RoPE and attention sinks (csrc/nn/rope.*, csrc/nn/attention.*), the blocks GPT-OSS needs besides its
experts, against transformers' own GPT-OSS functions. Goldens: tests/goldens/gpt_oss_blocks.json
(scripts/make_goldens.py gpt-oss-blocks). No torch here."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import float32_tol

from mlxrunner import _core

GOLDENS = json.loads((Path(__file__).parents[1] / "goldens" / "gpt_oss_blocks.json").read_text())
# float32 on both sides; positions near 5000 make an angle's float32 rounding ~1e-4 absolute.
TOL = float32_tol(1e-3, 1e-2)


def array(values, shape) -> mx.array:
    return mx.array(np.array(values, dtype=np.float32).reshape(shape))


@pytest.mark.parametrize("case", GOLDENS["yarn"], ids=[c["name"] for c in GOLDENS["yarn"]])
def test_yarn_rope_is_transformers(case):
    config = _core.RopeConfig.from_dict(case["rope_parameters"])
    ours = np.array(_core.rope(array(case["x"], case["shape"]), config, case["offset"]))
    ref = np.array(case["rotated"], dtype=np.float32).reshape(case["shape"])
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= TOL


def test_yarn_cases_differ_from_plain_rope():
    """The goldens would catch a YaRN that fell back to plain RoPE: its attention factor is not 1 and its
    frequencies are not theta's."""
    for case in GOLDENS["yarn"]:
        plain = _core.RopeConfig.from_dict({"rope_theta": case["rope_parameters"]["rope_theta"]})
        rotated = np.array(_core.rope(array(case["x"], case["shape"]), plain, case["offset"]))
        ref = np.array(case["rotated"], dtype=np.float32).reshape(case["shape"])
        assert np.abs(rotated - ref).max() > 0.1, case["name"]
    assert {c["name"]: round(c["attention_factor"], 4) != 1.0 for c in GOLDENS["yarn"]} == {
        "gpt-oss": True, "truncated": True, "mscale": True}


@pytest.mark.parametrize("case", GOLDENS["sinks"], ids=[c["name"] for c in GOLDENS["sinks"]])
def test_attention_with_sinks_is_transformers(case):
    q = array(case["q"], case["q_shape"])
    k, v = array(case["k"], case["kv_shape"]), array(case["v"], case["kv_shape"])
    ours = np.array(_core.attention(q, k, v, case["window"], case["scale"], mx.array(case["sinks"])))
    ref = np.array(case["out"], dtype=np.float32).reshape(case["q_shape"])
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= float32_tol(1e-5, 1e-2)
    without = np.array(_core.attention(q, k, v, case["window"], case["scale"]))
    assert np.abs(without - ref).max() > 1e-3  # the sinks change the result
