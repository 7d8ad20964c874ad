"""The batch decode attention kernel (nn/cuda_batch_attention.h) on CUDA against MLX's own attention, row by row.

A batch step's rows have caches of different lengths in one right-padded buffer; the kernel must give each row what
MLX's fused one-query attention gives that row alone over its own keys (the slots past its position hold stale
values it must not see). Grouped queries, head dims 64 and 128, a row of one key. Off CUDA the kernel declines
(None); its arithmetic is checked on the CPU by tests/unit/test_batch_attention_kernel.py.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU, assert_same_greedy_tokens, run_script_json, wide_head_model_copy

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()
QWEN3 = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "llm" / "qwen3-tiny"

CASES = [  # head dim, query heads, key/value heads, each row's position, capacity
    (128, 32, 8, [0, 3, 29, 200, 255], 256),
    (64, 4, 4, [17, 5], 32),
]


@pytest.mark.skipif(ON_CUDA, reason="on CUDA the kernel runs (the test below)")
def test_the_kernel_declines_off_cuda():
    q = mx.zeros((1, 2, 1, 64), mx.bfloat16)
    kv = mx.zeros((1, 2, 8, 64), mx.bfloat16)
    assert _core.cuda_batch_decode_attention(q, kv, kv, mx.array([3], mx.int32), 0.125) is None


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on CUDA only")
@pytest.mark.parametrize("d, q_heads, kv_heads, positions, capacity", CASES)
def test_each_row_gets_what_mlx_gives_it_alone(d, q_heads, kv_heads, positions, capacity):
    mx.random.seed(d + q_heads)
    rows, scale = len(positions), d ** -0.5
    q = mx.random.normal((rows, q_heads, 1, d)).astype(mx.bfloat16)
    keys = (2 * mx.random.normal((rows, kv_heads, capacity, d))).astype(mx.bfloat16)
    values = mx.random.normal((rows, kv_heads, capacity, d)).astype(mx.bfloat16)
    got = _core.cuda_batch_decode_attention(q, keys, values, mx.array(positions, mx.int32), scale)
    assert got is not None and got.shape == (rows, 1, q_heads * d)
    for b, position in enumerate(positions):
        alone = mx.fast.scaled_dot_product_attention(q[b:b + 1], keys[b:b + 1, :, : position + 1],
                                                     values[b:b + 1, :, : position + 1], scale=scale)
        want = np.array(alone.astype(mx.float32)).reshape(-1)
        have = np.array(got[b, 0].astype(mx.float32))
        np.testing.assert_allclose(have, want, rtol=2 ** -6, atol=2 ** -6 * np.abs(want).max())


BATCHED_AGAINST_ALONE = r"""
import json, sys
import mlxrunner
from mlxrunner import _core
from mlxrunner.llm import load
from mlxrunner.llm.model import sampler_options
from mlxrunner.request import Options

model = load(sys.argv[1])
greedy = sampler_options(Options(temperature=0.0, repeat_penalty=1.0))
prompts = [list(range(5, 5 + n)) for n in (7, 30, 55, 3)]
steps = 24

def alone(prompt):
    generator = _core.Generator(model.decoder, prompt, greedy, 512, 2)
    out = []
    for _ in range(steps):
        token = next(generator)
        out.append([token, generator.logprobs[1]])
    return out

batch = _core.BatchGenerator(model.decoder)
rows = {}
for prompt in prompts:  # rows of four lengths: the step's attention takes a mask, so the batch kernel
    generator = _core.Generator(model.decoder, prompt, greedy, 512, 2, None, 1)
    token = next(generator)
    rows[batch.join(generator)] = [[token, generator.logprobs[1]]]
while any(len(out) < steps for out in rows.values()):
    for row, token in batch.step():
        rows[row].append([token, batch.logprobs(row)[1]])
print(json.dumps({"batched": [rows[r][:steps] for r in sorted(rows)], "alone": [alone(p) for p in prompts]}))
"""


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel")
def test_a_batch_of_rows_of_different_lengths_decodes_as_each_row_alone(tmp_path):
    """A decoder's batch step through the kernel (rows of different lengths: a mask, which MLX's fused attention does
    not take) against each row decoded alone (the decode attention kernel), on a copy of the tiny Qwen3 with 64-wide
    heads (the kernels take 64 and 128; the fixture's are 16). Greedy tokens the same, unless the two best were within
    a rounding of each other at the step where they part (the two kernels sum in different orders)."""
    folder = str(wide_head_model_copy(QWEN3, tmp_path / "qwen3-tiny-wide", head_dim=64))
    result = run_script_json(BATCHED_AGAINST_ALONE, folder)
    for batched, alone in zip(result["batched"], result["alone"]):
        assert len(batched) == len(alone) == 24
        assert_same_greedy_tokens(batched, alone)


CACHE_LIMIT_AFTER_LOAD = """
import json, sys
import mlx.core as mx
from mlxrunner import store
from mlxrunner.llm.model import LanguageModel
default = mx.set_cache_limit(0)
mx.set_cache_limit(default)
model = LanguageModel(store.resolve(sys.argv[1]))
print(json.dumps({"default": default, "after_load": mx.set_cache_limit(0)}))
"""


@pytest.mark.skipif(not ON_GPU, reason="the bound is set on a GPU only (the CPU's MLX cache keeps 32 MiB)")
def test_a_language_model_holds_mlx_cache_to_its_bound_on_a_gpu():
    """An LLM on a GPU lowers MLX's buffer cache from its default (the memory limit) to GPU_CACHE_BYTES: a cache let
    grow toward the limit is how 64 concurrent streams on an H100 slowed to 0.75 s a step (llm/model.py says more)."""
    from mlxrunner.llm.model import GPU_CACHE_BYTES

    result = run_script_json(CACHE_LIMIT_AFTER_LOAD, str(QWEN3))
    assert result["default"] > GPU_CACHE_BYTES
    assert result["after_load"] == GPU_CACHE_BYTES
