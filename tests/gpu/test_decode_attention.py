"""The attention kernels that write new keys and values into the cache in place (csrc/nn/cuda_decode_attention.h): a
decode step's, and a chunk's of 2 to 128 tokens (on tensor cores).

On CUDA the decoder's single-sequence forwards take them (KVCache::writes_in_place, append_buffers): each kernel must
give MLX's attention to the rounding of its sums, write exactly the new keys and values into their slots and nothing
else, and a decoder must give the same greedy tokens with them as with MLX's slice updates and attention
(MLXRUNNER_DECODE_ATTENTION=0 and MLXRUNNER_CHUNK_ATTENTION=0). The in-place writes must not reach a cache
the prompt cache keeps: the same prompt sent three times (the later requests resume from a copy of the first one's
cache) gives the same tokens each time, and a follow-up resumes from a copy too.
Off CUDA the binding declines (None), and the decoder runs MLX's operations (the CPU parity tests).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU, assert_same_greedy_tokens, run_script_json, wide_head_model_copy

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
QWEN3 = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
LLAMA3 = ROOT / "tests" / "fixtures" / "llm" / "llama3-tiny"
SWITCH = "MLXRUNNER_DECODE_ATTENTION"
CHUNK_SWITCH = "MLXRUNNER_CHUNK_ATTENTION"
ROPE_SWITCH = "MLXRUNNER_DECODE_ROPE"
CHUNK_ROPE_SWITCH = "MLXRUNNER_CHUNK_ROPE"


def assert_same_bits(roped, two_kernels, cache, cache_two, k, k_raw):
    """The kernel that ropes against the q/k kernel then the plain one: the same attention and the same cache, bit for
    bit, and a rotation that changed the keys."""
    assert mx.array_equal(cache[0], cache_two[0]).item() and mx.array_equal(cache[1], cache_two[1]).item()
    assert mx.array_equal(roped, two_kernels).item()
    assert not mx.array_equal(k, k_raw).item()  # the rotation did something


def inputs(d, q_heads, kv_heads, capacity, seed, tokens=1):
    """q [1, q_heads, tokens, D] (a heads-first view of a tokens-first array), k and v [1, kv_heads, tokens, D] (v a
    strided view, as the decoder's values are of the q|k|v product), and a cache's buffers of `capacity` positions."""
    key = mx.random.key(seed)
    kq, kk, kv, kc, kw = mx.random.split(key, 5)
    q = mx.random.normal((1, tokens, q_heads, d), key=kq).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    k = (2 * mx.random.normal((1, kv_heads, tokens, d), key=kk)).astype(mx.bfloat16)
    projection = mx.random.normal((1, tokens, 3 * kv_heads, d), key=kv).astype(mx.bfloat16)
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


STEP_SCRIPT = r"""
import json, sys
sys.path[:0] = ["tests", "tests/gpu"]  # run from the repository: this module's inputs()
import mlxrunner
import mlx.core as mx
from mlxrunner import _core
from test_decode_attention import inputs

rounds = int(sys.argv[1])  # the same steps again: each launch gives the same bits
gaps, outs = [], []
for d, q_heads, kv_heads, position, capacity in ((128, 32, 8, 150, 256), (128, 32, 8, 1087, 1280)):
    q, k, v, keys, values = inputs(d, q_heads, kv_heads, capacity, position + d)
    scale = d ** -0.5
    expected = mx.fast.scaled_dot_product_attention(q, mx.concatenate([keys[:, :, :position], k], axis=2),
                                                    mx.concatenate([values[:, :, :position], v], axis=2), scale=scale)
    expected = expected.transpose(0, 2, 1, 3).reshape(1, 1, -1).astype(mx.float32)
    mx.eval(expected)
    got = []
    for _ in range(rounds):
        out = _core.cuda_decode_attention(q, k, v, keys, values, mx.array([position], mx.int32), position + 1, scale)
        got.append(out.astype(mx.float32).reshape(-1).tolist())
    assert all(again == got[0] for again in got), "a later launch of the same step differs"
    gaps.append((mx.abs(mx.array(got[0]) - expected.reshape(-1)).max() / mx.abs(expected).max()).item())
    outs.append(got[0])
print(json.dumps([gaps, outs]))
"""


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel")
@pytest.mark.parametrize("split_keys", [None, "64"], ids=["16 keys a split (default)", "64 keys a split"])
def test_the_kernel_is_mlx_attention_at_any_split_size(split_keys):
    """The default 16 keys a split (10 and 64 splits of the steps' keys, the second at the cap) and
    MLXRUNNER_DECODE_SPLIT_KEYS=64 (a measuring switch, read once: a fresh process; 3 and 17 splits): each step's
    attention MLX's to the rounding of its sums, and two launches of a step the same bits."""
    environment = {"MLXRUNNER_DECODE_SPLIT_KEYS": split_keys} if split_keys else {}
    gaps, _ = run_script_json(STEP_SCRIPT, "2", environment=environment, unset=["MLXRUNNER_DECODE_SPLIT_KEYS"])
    assert len(gaps) == 2 and all(gap <= 2 ** -6 for gap in gaps), gaps


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel")
@pytest.mark.parametrize("norm", [False, True], ids=["RoPE (Llama)", "q/k norms and RoPE (Qwen3)"])
@pytest.mark.parametrize("traditional", [False, True])
def test_the_kernel_that_ropes_gives_the_qk_kernel_then_the_plain_kernels_bits(norm, traditional):
    """q and k as projected (views of one q|k|v row): the decode kernel that makes their norms and RoPE itself writes
    the same key into the cache and gives the same attention, bit for bit, as the q/k kernel and then the kernel that
    takes them rotated (the decoder with MLXRUNNER_DECODE_ROPE=0)."""
    d, q_heads, kv_heads, position, capacity = 128, 32, 8, 150, 256
    key = mx.random.key(position)
    qkv = (3 * mx.random.normal((1, 1, q_heads + 2 * kv_heads, d), key=key)).astype(mx.bfloat16)
    q_weight = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(1))).astype(mx.bfloat16) if norm else None
    k_weight = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(2))).astype(mx.bfloat16) if norm else None
    config = _core.RopeConfig.from_dict({"rope_theta": 500000.0, "traditional": traditional})
    position_array = mx.array([position], mx.int32)
    heads = qkv.transpose(0, 2, 1, 3)
    q_raw, k_raw, v = heads[:, :q_heads], heads[:, q_heads : q_heads + kv_heads], heads[:, q_heads + kv_heads :]
    _, _, _, keys, values = inputs(d, q_heads, kv_heads, capacity, 7)
    _, _, _, keys_two, values_two = inputs(d, q_heads, kv_heads, capacity, 7)  # the same, in buffers of their own
    mx.eval(keys, values, keys_two, values_two)
    q, k, _ = _core.cuda_qkv_heads(qkv, q_heads, kv_heads, config, position_array, q_weight, k_weight)
    two_kernels = _core.cuda_decode_attention(q, k, v, keys_two, values_two, position_array, position + 1, d ** -0.5)
    roped = _core.cuda_decode_attention_roped(q_raw, k_raw, v, keys, values, position_array, position + 1, d ** -0.5,
                                              config, q_weight, k_weight)
    assert roped is not None
    assert mx.array_equal(keys[:, :, position], k[:, :, 0]).item()
    assert_same_bits(roped, two_kernels, (keys, values), (keys_two, values_two), k, k_raw)


@pytest.mark.skipif(not ON_CUDA, reason="the in-place attention kernels run on CUDA only")
@pytest.mark.parametrize("fixture, head_dim", [(QWEN3, 64), (LLAMA3, 128)], ids=["qwen3 (q/k norms)", "llama3"])
def test_a_decoder_gives_the_same_bits_whether_the_decode_kernel_ropes_or_not(tmp_path, fixture, head_dim):
    """The decoder's decode steps with the attention kernel making the q/k norms and RoPE (the default) and with the
    q/k kernel making them first (MLXRUNNER_DECODE_ROPE=0): the same tokens and the same log-probabilities."""
    folder = str(wide_head_model_copy(fixture, tmp_path / "wide", head_dim=head_dim))
    in_kernel = run_script_json(SCRIPT, folder, unset=[ROPE_SWITCH, SWITCH, CHUNK_SWITCH])
    separate = run_script_json(SCRIPT, folder, unset=[SWITCH, CHUNK_SWITCH], environment={ROPE_SWITCH: "0"})
    assert [len(run) for run in in_kernel] == [len(run) for run in separate]
    assert in_kernel == separate
    assert sum(len(run) for run in in_kernel) >= 40  # decode steps ran (a run ends early where the model says stop)


@pytest.mark.skipif(ON_CUDA, reason="off CUDA only")
def test_the_binding_declines_off_cuda():
    q, k, v, keys, values = inputs(64, 4, 2, 64, 0)
    assert _core.cuda_decode_attention(q, k, v, keys, values, mx.array([3], mx.int32), 4, 0.125) is None
    config = _core.RopeConfig.from_dict({"rope_theta": 10000.0})
    assert _core.cuda_decode_attention_roped(q, k, v, keys, values, mx.array([3], mx.int32), 4, 0.125, config) is None


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel")
@pytest.mark.parametrize("d, q_heads, kv_heads, tokens, offset, capacity", [
    (128, 32, 8, 64, 3000, 3072),   # the prompt cache bench's follow-up on a Qwen3-4B
    (128, 32, 8, 2, 0, 256),        # a fresh cache, two tokens
    (64, 16, 8, 37, 300, 512),
    (128, 64, 8, 128, 1000, 1280),  # 8 queries a key head (a 70B's grouping), the longest chunk the kernel takes
])
def test_the_chunk_kernel_is_mlx_causal_attention_over_the_written_cache(d, q_heads, kv_heads, tokens, offset,
                                                                         capacity):
    q, k, v, keys, values = inputs(d, q_heads, kv_heads, capacity, offset + tokens, tokens)
    before_keys, before_values = np.array(keys.astype(mx.float32)), np.array(values.astype(mx.float32))
    scale = d ** -0.5
    length = offset + tokens
    out = _core.cuda_chunk_attention(q, k, v, keys, values, mx.array([offset], mx.int32), length, scale)
    assert out is not None and out.shape == (1, tokens, q_heads * d) and out.dtype == mx.bfloat16
    after_keys, after_values = np.array(keys.astype(mx.float32)), np.array(values.astype(mx.float32))
    np.testing.assert_array_equal(after_keys[0, :, offset:length], np.array(k.astype(mx.float32))[0])
    np.testing.assert_array_equal(after_values[0, :, offset:length], np.array(v.astype(mx.float32))[0])
    others = np.ones(capacity, bool)
    others[offset:length] = False
    np.testing.assert_array_equal(after_keys[:, :, others], before_keys[:, :, others])
    np.testing.assert_array_equal(after_values[:, :, others], before_values[:, :, others])
    seen_keys = mx.array(after_keys[:, :, :length]).astype(mx.bfloat16)
    seen_values = mx.array(after_values[:, :, :length]).astype(mx.bfloat16)
    # token t at position offset + t sees positions 0 .. offset + t
    mask = mx.arange(length)[None, :] <= (offset + mx.arange(tokens))[:, None]
    expected = mx.fast.scaled_dot_product_attention(q, seen_keys, seen_values, scale=scale, mask=mask)
    expected = np.array(expected.transpose(0, 2, 1, 3).reshape(1, tokens, -1).astype(mx.float32))
    got = np.array(out.astype(mx.float32))
    # the probabilities rounded to bfloat16 for the second product (as flash attention does, cuDNN's among them)
    assert np.max(np.abs(got - expected)) <= 2 ** -6 * max(np.max(np.abs(expected)), 1e-3)


@pytest.mark.skipif(ON_CUDA, reason="off CUDA only")
def test_the_chunk_binding_declines_off_cuda():
    q, k, v, keys, values = inputs(64, 4, 2, 64, 0, tokens=5)
    assert _core.cuda_chunk_attention(q, k, v, keys, values, mx.array([3], mx.int32), 8, 0.125) is None
    config = _core.RopeConfig.from_dict({"rope_theta": 10000.0})
    qkv = mx.zeros((1, 5, 8 * 64), mx.bfloat16)
    assert _core.cuda_chunk_attention_from_product(qkv, 4, 2, keys, values, mx.array([3], mx.int32), 8, 0.125,
                                                   config) is None


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel")
@pytest.mark.parametrize("norm", [False, True], ids=["RoPE (Llama)", "q/k norms and RoPE (Qwen3)"])
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("tokens, offset", [(64, 3000), (9, 0)])
def test_the_chunk_kernel_that_ropes_gives_the_qk_kernel_then_the_plain_kernels_bits(norm, traditional, tokens,
                                                                                     offset):
    """The q|k|v product as projected: the chunk kernel that reads its heads in place and makes the q/k norms and RoPE
    itself (the decoder's default) writes the same keys and values into the cache and gives the same
    attention, bit for bit, as the q/k kernel and then the plain chunk kernel."""
    d, q_heads, kv_heads = 128, 32, 8
    capacity = offset + tokens + 8
    qkv = (3 * mx.random.normal((1, tokens, q_heads + 2 * kv_heads, d), key=mx.random.key(tokens))).astype(mx.bfloat16)
    q_weight = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(1))).astype(mx.bfloat16) if norm else None
    k_weight = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(2))).astype(mx.bfloat16) if norm else None
    config = _core.RopeConfig.from_dict({"rope_theta": 500000.0, "traditional": traditional})
    position = mx.array([offset], mx.int32)
    heads = qkv.transpose(0, 2, 1, 3)
    k_raw, v = heads[:, q_heads : q_heads + kv_heads], heads[:, q_heads + kv_heads :]
    _, _, _, keys, values = inputs(d, q_heads, kv_heads, capacity, 7)
    _, _, _, keys_two, values_two = inputs(d, q_heads, kv_heads, capacity, 7)  # the same, in buffers of their own
    mx.eval(keys, values, keys_two, values_two)
    q, k, _ = _core.cuda_qkv_heads(qkv, q_heads, kv_heads, config, position, q_weight, k_weight)
    length, scale = offset + tokens, d ** -0.5
    two_kernels = _core.cuda_chunk_attention(q, k, v, keys_two, values_two, position, length, scale)
    product = qkv.reshape(1, tokens, (q_heads + 2 * kv_heads) * d)
    roped = _core.cuda_chunk_attention_from_product(product, q_heads, kv_heads, keys, values, position, length, scale,
                                                    config, q_weight, k_weight)
    assert roped is not None
    assert mx.array_equal(keys[:, :, offset:length], k).item()
    assert_same_bits(roped, two_kernels, (keys, values), (keys_two, values_two), k, k_raw)


@pytest.mark.skipif(not ON_CUDA, reason="the in-place attention kernels run on CUDA only")
@pytest.mark.parametrize("fixture, head_dim", [(QWEN3, 64), (LLAMA3, 128)], ids=["qwen3 (q/k norms)", "llama3"])
def test_a_decoder_gives_the_same_bits_whether_the_chunk_kernel_ropes_or_not(tmp_path, fixture, head_dim):
    """The decoder's chunks (a fresh prompt, a follow-up on a kept cache) with the chunk kernel making the q/k norms
    and RoPE (the default) and with the q/k kernel making them first (MLXRUNNER_CHUNK_ROPE=0): the same tokens and the
    same log-probabilities."""
    folder = str(wide_head_model_copy(fixture, tmp_path / "wide", head_dim=head_dim))
    switches = [ROPE_SWITCH, SWITCH, CHUNK_SWITCH, CHUNK_ROPE_SWITCH]
    in_kernel = run_script_json(SCRIPT, folder, unset=switches)
    separate = run_script_json(SCRIPT, folder, unset=switches, environment={CHUNK_ROPE_SWITCH: "0"})
    assert [len(run) for run in in_kernel] == [len(run) for run in separate]
    assert in_kernel == separate
    assert sum(len(run) for run in in_kernel) >= 40


SCRIPT = r"""
import json, sys
import mlxrunner
from mlxrunner.llm import load
from mlxrunner.llm.answer import TokenLogprob
from mlxrunner.request import Options

model = load(sys.argv[1])
options = Options(temperature=0.0, repeat_penalty=1.0, num_predict=40)
prompt = list(range(5, 35))
follow_up = prompt + list(range(300, 320))
runs = []
# A 30-token prompt (a chunk on a fresh cache), twice more (those resume from a copy of the first request's cache: a
# one-token forward), then it + a 20-token follow-up (a chunk on a copy of a kept cache, then decode steps).
for ids in (prompt, prompt, prompt, follow_up):
    items = list(model.stream(ids, options, top_logprobs=2))
    runs.append([[item.token.hex(), [[t.hex(), p] for t, p in item.top]]
                 for item in items if isinstance(item, TokenLogprob)])
print(json.dumps(runs))
"""


@pytest.mark.skipif(not ON_CUDA, reason="the in-place attention kernels run on CUDA only")
def test_a_decoder_gives_the_same_tokens_and_keeps_the_prompt_cache_intact(tmp_path):
    # head dim 64: the kernels take 64 and 128, the fixture has 16
    folder = str(wide_head_model_copy(QWEN3, tmp_path / "qwen3-tiny-wide", head_dim=64))
    switches = [SWITCH, CHUNK_SWITCH]
    in_place = run_script_json(SCRIPT, folder, unset=switches)  # both kernels are on by default
    mlx_ops = run_script_json(SCRIPT, folder, unset=switches, environment={SWITCH: "0", CHUNK_SWITCH: "0"})
    assert all(len(run) == 40 for run in in_place)
    tokens = [[token for token, _ in run] for run in in_place]
    assert tokens[0] == tokens[1] == tokens[2]  # a kept cache was not written by a later request
    for ours, theirs in zip(in_place, mlx_ops):
        assert_same_greedy_tokens(ours, theirs)
