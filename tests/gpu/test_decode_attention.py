"""A decode step's attention that writes its key and value into the cache in place (csrc/nn/cuda_decode_attention.h).

On CUDA the decoder's single-sequence decode steps take it (KVCache::writes_in_place): the kernel must give MLX's
attention to the rounding of a float sum in another order, write exactly the step's key and value into the step's slot
and nothing else, and a decoder must give the same greedy tokens with it as with MLX's slice updates and attention
(MLXRUNNER_DECODE_ATTENTION=0). The in-place write must not reach a cache the prompt cache keeps: the same prompt sent
three times (the later requests resume from a copy of the first one's cache) gives the same tokens each time.
Off CUDA the binding declines (None), and the decoder runs MLX's operations (the CPU parity tests).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU, bf16_model_copy, run_script_json

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
QWEN3 = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
SWITCH = "MLXRUNNER_DECODE_ATTENTION"


def inputs(d, q_heads, kv_heads, capacity, seed):
    key = mx.random.key(seed)
    kq, kk, kv, kc, kw = mx.random.split(key, 5)
    q = mx.random.normal((1, q_heads, 1, d), key=kq).astype(mx.bfloat16)
    k = (2 * mx.random.normal((1, kv_heads, 1, d), key=kk)).astype(mx.bfloat16)
    # v a strided view, as the decoder's values are of the q|k|v product
    projection = mx.random.normal((1, 1, 3 * kv_heads, d), key=kv).astype(mx.bfloat16)
    v = projection[:, :, kv_heads : 2 * kv_heads].transpose(0, 2, 1, 3)
    keys = (2 * mx.random.normal((1, kv_heads, capacity, d), key=kc)).astype(mx.bfloat16)
    values = mx.random.normal((1, kv_heads, capacity, d), key=kw).astype(mx.bfloat16)
    mx.eval(q, k, v, keys, values)
    return q, k, v, keys, values


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel")
@pytest.mark.parametrize("d, q_heads, kv_heads, position, capacity", [
    (128, 32, 8, 0, 256), (128, 32, 8, 1087, 1280), (64, 16, 8, 300, 512), (128, 8, 8, 4096, 4352),
])
def test_the_kernel_is_mlx_attention_over_the_written_cache(d, q_heads, kv_heads, position, capacity):
    q, k, v, keys, values = inputs(d, q_heads, kv_heads, capacity, position + d)
    before_keys, before_values = np.array(keys.astype(mx.float32)), np.array(values.astype(mx.float32))
    scale = d ** -0.5
    out = _core.cuda_decode_attention(q, k, v, keys, values, mx.array([position], mx.int32), position + 1, scale)
    assert out is not None and out.shape == (1, 1, q_heads * d) and out.dtype == mx.bfloat16
    after_keys, after_values = np.array(keys.astype(mx.float32)), np.array(values.astype(mx.float32))
    np.testing.assert_array_equal(after_keys[0, :, position], np.array(k.astype(mx.float32))[0, :, 0])
    np.testing.assert_array_equal(after_values[0, :, position], np.array(v.astype(mx.float32))[0, :, 0])
    others = np.arange(capacity) != position
    np.testing.assert_array_equal(after_keys[:, :, others], before_keys[:, :, others])
    np.testing.assert_array_equal(after_values[:, :, others], before_values[:, :, others])
    seen_keys = mx.array(after_keys[:, :, : position + 1]).astype(mx.bfloat16)
    seen_values = mx.array(after_values[:, :, : position + 1]).astype(mx.bfloat16)
    expected = mx.fast.scaled_dot_product_attention(q, seen_keys, seen_values, scale=scale)
    expected = np.array(expected.transpose(0, 2, 1, 3).reshape(1, 1, -1).astype(mx.float32))
    got = np.array(out.astype(mx.float32))
    assert np.max(np.abs(got - expected)) <= 2 ** -7 * max(np.max(np.abs(expected)), 1e-3) * 2


@pytest.mark.skipif(ON_CUDA, reason="off CUDA only")
def test_the_binding_declines_off_cuda():
    q, k, v, keys, values = inputs(64, 4, 2, 64, 0)
    assert _core.cuda_decode_attention(q, k, v, keys, values, mx.array([3], mx.int32), 4, 0.125) is None


SCRIPT = r"""
import json, sys
import mlxrunner
from mlxrunner.llm import load
from mlxrunner.llm.answer import TokenLogprob
from mlxrunner.request import Options

model = load(sys.argv[1])
options = Options(temperature=0.0, repeat_penalty=1.0, num_predict=40)
runs = []
for _ in range(3):  # the second and third resume from copies of the first request's cache
    items = list(model.stream(list(range(5, 35)), options, top_logprobs=0))
    runs.append([[item.token.hex(), item.logprob] for item in items if isinstance(item, TokenLogprob)])
print(json.dumps(runs))
"""


@pytest.mark.skipif(not ON_CUDA, reason="the in-place decode attention runs on CUDA only")
def test_a_decoder_gives_the_same_tokens_and_keeps_the_prompt_cache_intact(tmp_path):
    folder = str(bf16_model_copy(QWEN3, tmp_path / "qwen3-tiny-bf16"))
    in_place = run_script_json(SCRIPT, folder, unset=[SWITCH])
    mlx_ops = run_script_json(SCRIPT, folder, unset=[SWITCH], environment={SWITCH: "0"})
    tokens = [[token for token, _ in r] for r in in_place]
    assert len(tokens[0]) == 40
    assert tokens[0] == tokens[1] == tokens[2]  # a kept cache was not written by a later request
    assert tokens[0] == [token for token, _ in mlx_ops[0]]
    for (_, a), (_, b) in zip(in_place[0], mlx_ops[0]):
        assert abs(a - b) < 0.05  # log-probabilities: the same to the rounding of the attention's sums
