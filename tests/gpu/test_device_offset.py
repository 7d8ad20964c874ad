"""A forward's first position made by the device (Decoder::device_offset, csrc/text/decoder.h) on CUDA.

The fused q/k norm + RoPE kernel reads the position from an array. Made from a host int, that array is a page of host
memory on CUDA, read across the bus by every layer's kernel (6.1 us a kernel in the 8B decode profile of session 22,
3.6 us with the position made by the device), and so is the decode attention kernel's. The numbers must not change:
the same kernels read the same int. So a tiny Qwen3 (bf16, heads widened to 64 so that both kernels run) must give the
same logits for prompts of 1 to 40 tokens, and the same greedy continuation over 24 decode steps (a new position each
step), with MLXRUNNER_DEVICE_OFFSET=0 (the host array) as without it, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from conftest import ON_GPU, run_script_json, wide_head_model_copy

ON_CUDA = ON_GPU and mx.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
QWEN3 = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
SWITCH = "MLXRUNNER_DEVICE_OFFSET"

SCRIPT = r"""
import json, sys
import mlxrunner
from mlxrunner.llm import load
from mlxrunner.llm.answer import TokenLogprob
from mlxrunner.request import Options

model = load(sys.argv[1])
logits = [model.logits(list(range(3, 3 + n))).tolist() for n in (1, 2, 9, 40)]
ids = list(range(5, 35))
options = Options(temperature=0.0, repeat_penalty=1.0, num_predict=24)
items = list(model.stream(ids, options, top_logprobs=0))
tokens = [[item.token.hex(), item.logprob] for item in items if isinstance(item, TokenLogprob)]
print(json.dumps({"logits": logits, "tokens": tokens}))
"""


@pytest.mark.skipif(not ON_CUDA, reason="the position is made by the device on CUDA only")
def test_the_device_made_position_gives_the_same_logits_and_tokens(tmp_path):
    # heads 64 wide: the fused q/k kernel and the decode attention kernel, both readers of the position, take no less
    # (the fixture's are 16 wide)
    folder = str(wide_head_model_copy(QWEN3, tmp_path / "qwen3-tiny-wide", head_dim=64))
    on_device = run_script_json(SCRIPT, folder, unset=[SWITCH])
    on_host = run_script_json(SCRIPT, folder, unset=[SWITCH], environment={SWITCH: "0"})
    assert len(on_device["tokens"]) == 24
    assert on_device == on_host
