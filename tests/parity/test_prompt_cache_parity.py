"""A prompt cache hit gives the output a cold run gives: the tiny Qwen3 in-process, a runner with the cache
against one without (`prompt_cache_bytes=0`). Tokens and text are identical; log-probabilities agree to float
rounding, and bit for bit where the reused prefix ends on a prefill chunk boundary (docs/models/llm.md says
why only there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import float32_tol

from mlxrunner import store
from mlxrunner.errors import Cancelled
from mlxrunner.llm.answer import Completion, TokenLogprob
from mlxrunner.llm.model import PREFILL_CHUNK, LanguageModel
from mlxrunner.request import Options

QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"
GREEDY = dict(temperature=0.0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def cold():
    return LanguageModel(store.resolve(str(QWEN3)), prompt_cache_bytes=0)


@pytest.fixture
def warm():
    return LanguageModel(store.resolve(str(QWEN3)))


def ids(n: int, salt: int = 0) -> list[int]:
    return [(17 * i + 3 + salt) % 499 for i in range(n)]


def run(model: LanguageModel, prompt: list[int], **options) -> tuple[str, list[TokenLogprob], Completion]:
    items = list(model.stream(prompt, Options(**{**GREEDY, **options}), top_logprobs=3))
    text = "".join(x for x in items if isinstance(x, str))
    return text, [x for x in items if isinstance(x, TokenLogprob)], items[-1]


def assert_same_output(warm_run, cold_run, exact: bool = False) -> None:
    (warm_text, warm_lps, _), (cold_text, cold_lps, _) = warm_run, cold_run
    assert warm_text == cold_text
    assert [lp.token for lp in warm_lps] == [lp.token for lp in cold_lps]
    assert [[t for t, _ in lp.top] for lp in warm_lps] == [[t for t, _ in lp.top] for lp in cold_lps]
    got = np.array([[lp.logprob] + [v for _, v in lp.top] for lp in warm_lps])
    want = np.array([[lp.logprob] + [v for _, v in lp.top] for lp in cold_lps])
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=float32_tol(1e-4, 5e-2))


def test_the_next_turn_reuses_the_prompt_and_the_reply(warm, cold):
    first = ids(300)
    _, _, done = run(warm, first, num_predict=24)
    assert done.prompt_cache_count == 0 and done.prompt_eval_count == 300
    (held,) = warm.prompt_cache.sequences()
    # The prompt and every token returned (an EOS too), but the last one when the budget ended the answer: no
    # step runs past the budget, so that token's keys were never computed.
    returned = done.eval_count + (done.done_reason == "stop")
    assert held[:300] == first and len(held) == 300 + returned - (done.done_reason == "length")
    second = held + ids(40, salt=7)
    warm_run = run(warm, second, num_predict=24)
    assert warm_run[2].prompt_cache_count == len(held) and warm_run[2].prompt_eval_count == len(second)
    assert_same_output(warm_run, run(cold, second, num_predict=24))


def test_seeded_sampling_is_the_same_with_a_hit(warm, cold):
    prompt = ids(200)
    sampled = dict(temperature=0.9, top_k=40, top_p=0.9, seed=11, num_predict=30)
    run(warm, prompt + [5], **sampled)
    warm_run = run(warm, prompt + [6, 7], **sampled)
    assert warm_run[2].prompt_cache_count == 200
    assert_same_output(warm_run, run(cold, prompt + [6, 7], **sampled))


def test_a_prefix_that_ends_on_a_prefill_chunk_is_reused_bit_for_bit(warm, cold):
    shared = ids(PREFILL_CHUNK)
    run(warm, shared + ids(100, salt=1), num_predict=4)
    second = shared + ids(80, salt=2)
    warm_run = run(warm, second, num_predict=16)
    assert warm_run[2].prompt_cache_count == PREFILL_CHUNK
    assert_same_output(warm_run, run(cold, second, num_predict=16), exact=True)


def test_a_cancel_mid_prefill_keeps_what_was_prefilled(warm, cold):
    prompt = ids(3 * PREFILL_CHUNK + 20)
    checks = 0

    def cancel_after_two_chunks():
        nonlocal checks
        checks += 1
        if checks == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        list(warm.stream(prompt, Options(**GREEDY, num_predict=8), check_cancelled=cancel_after_two_chunks))
    assert warm.prompt_cache.sequences() == [prompt[:2 * PREFILL_CHUNK]]
    warm_run = run(warm, prompt, num_predict=8)
    assert warm_run[2].prompt_cache_count == 2 * PREFILL_CHUNK
    assert_same_output(warm_run, run(cold, prompt, num_predict=8), exact=True)


def test_a_cancel_mid_decode_keeps_the_tokens_generated(warm, cold):
    prompt = ids(150)
    checks = 0

    def cancel_after_five_tokens():
        nonlocal checks
        checks += 1
        if checks == 5 + 1:  # five tokens, then cancel (a prompt within one chunk runs with the first token)
            raise Cancelled()

    with pytest.raises(Cancelled):
        list(warm.stream(prompt, Options(**GREEDY, num_predict=50), check_cancelled=cancel_after_five_tokens))
    (held,) = warm.prompt_cache.sequences()
    assert len(held) == 155 and held[:150] == prompt
    warm_run = run(warm, prompt, num_predict=20)
    assert warm_run[2].prompt_cache_count == 149
    assert_same_output(warm_run, run(cold, prompt, num_predict=20))


def test_a_stream_its_consumer_drops_keeps_what_it_computed_and_changes_nothing_else(warm, cold):
    """The dropped stream had taken the stored sequence (its prompt extends it) and written its follow-up into the
    same buffers: the sequence comes back, extended, and a prompt that diverges after the stored part is a cold
    run's."""
    first = ids(120)
    run(warm, first, num_predict=10)
    (held,) = warm.prompt_cache.sequences()
    stream = warm.stream(held + [3, 4], Options(**GREEDY, num_predict=60), top_logprobs=0)
    for _ in range(6):
        next(stream)
    stream.close()  # the consumer went away between two tokens, with no cancel
    (kept,) = warm.prompt_cache.sequences()
    assert kept[: len(held) + 2] == held + [3, 4] and len(kept) > len(held) + 2
    follow_up = held + [5, 6]
    warm_run = run(warm, follow_up, num_predict=12)
    assert warm_run[2].prompt_cache_count == len(held)
    assert_same_output(warm_run, run(cold, follow_up, num_predict=12))


@pytest.mark.parametrize("fixture, diverged_reuse", [
    # Sliding-window layers (window 8) keep only their last positions: the window of a shorter prefix has been
    # overwritten, so a prompt that diverges inside a cached sequence is computed cold.
    ("mistral-tiny", 0), ("gemma3-tiny", 0),
    # Routed experts keep nothing between tokens, and GLM's latent cache (latents and rope keys in a KVCache)
    # trims and copies as any full cache does: the shared prefix is reused.
    ("qwen3-moe-tiny", 20), ("glm4-moe-lite-tiny", 20),
])
def test_every_cache_kind_reuses_what_it_still_holds(fixture, diverged_reuse):
    """A prompt that extends a cached sequence whole reuses all of it (nothing to trim); one that diverges
    inside it reuses what the model's caches can still give back. Either way the output is a cold run's."""
    folder = Path(__file__).parents[1] / "fixtures" / "llm" / fixture
    warm = LanguageModel(store.resolve(str(folder)))
    cold = LanguageModel(store.resolve(str(folder)), prompt_cache_bytes=0)
    first = ids(40)
    run(warm, first, num_predict=6)
    (held,) = warm.prompt_cache.sequences()
    extended = held + ids(12, salt=3)
    warm_run = run(warm, extended, num_predict=12)
    assert warm_run[2].prompt_cache_count == len(held)
    assert_same_output(warm_run, run(cold, extended, num_predict=12))
    diverged = first[:20] + ids(15, salt=5)
    warm_run = run(warm, diverged, num_predict=12)
    assert warm_run[2].prompt_cache_count == diverged_reuse
    assert_same_output(warm_run, run(cold, diverged, num_predict=12))
