"""The prompt cache's bookkeeping (llm/prompt_cache.py) on real layer caches from the tiny Qwen3's generator:
hits, partial hits, trimming, eviction by bytes, sequences that extend each other, copies kept independent."""

from __future__ import annotations

import threading
from pathlib import Path

import mlx.core as mx
import pytest

from mlxrunner import _core
from mlxrunner.llm import load
from mlxrunner.llm.batch import prefilled
from mlxrunner.llm.model import sampler_options
from mlxrunner.llm.prompt_cache import HAND_OVER_TAIL, PromptCache
from mlxrunner.request import Options

QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"
GREEDY = Options(temperature=0.0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def model():
    return load(str(QWEN3))


def ids(n: int, salt: int = 0) -> list[int]:
    return [(17 * i + 3 + salt) % 499 for i in range(n)]


def run(model, prompt: list[int], n: int, caches=None) -> tuple[list[int], _core.SequenceCache]:
    """n greedy tokens after `prompt`, and the caches then (prompt + the n tokens)."""
    generator = _core.Generator(model.decoder, prompt, sampler_options(GREEDY), 512, -1, caches)
    tokens = [next(generator) for _ in range(n)]
    return tokens, generator.take_cache()


def stored(model, prompt: list[int], n: int = 4) -> tuple[list[int], _core.SequenceCache]:
    tokens, caches = run(model, prompt, n)
    return prompt + tokens, caches


def test_the_generators_caches_hold_the_prompt_and_every_token_returned(model):
    tokens, caches = stored(model, ids(40), 5)
    assert caches.length == len(tokens) == 45
    assert caches.nbytes > 0


def test_a_prompt_that_extends_a_stored_sequence_reuses_all_of_it(model):
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(40))
    cache.insert(tokens, caches)
    hit, reused = cache.fetch(tokens + [7, 8, 9])
    assert reused == len(tokens) and hit.length == reused


def test_a_partial_match_is_trimmed_to_the_shared_prefix(model):
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(40))
    cache.insert(tokens, caches)
    shared = len(tokens) - HAND_OVER_TAIL - 1  # a tail of the stored sequence too long to give up
    hit, reused = cache.fetch(tokens[:shared] + [1, 2, 3])
    assert reused == shared and hit.length == shared
    # The entry itself keeps all its positions: the hit was a copy.
    again, reused_again = cache.fetch(tokens + [5])
    assert reused_again == len(tokens) and again.length == len(tokens)


def test_a_match_but_for_a_short_tail_is_handed_over_trimmed(model):
    """A stored sequence the prompt extends but for at most HAND_OVER_TAIL positions (the token generated after a
    reply that the client did not send back) leaves the cache for the request, trimmed: no copy."""
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(40))
    cache.insert(tokens, caches)
    shared = len(tokens) - HAND_OVER_TAIL
    hit, reused = cache.fetch(tokens[:shared] + [1, 2, 3])
    assert reused == shared and hit.length == shared and len(cache) == 0
    # What it gives is what a cold prefill gives.
    follow_up = tokens[:shared] + [1, 2, 3]
    assert run(model, follow_up, 6, hit)[0] == run(model, follow_up, 6)[0]


def test_the_last_prompt_token_never_comes_from_the_cache(model):
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(30))
    cache.insert(tokens, caches)
    hit, reused = cache.fetch(tokens)
    assert reused == len(tokens) - 1 and hit.length == reused


def test_no_shared_prefix_is_a_miss(model):
    cache = PromptCache(1 << 30)
    cache.insert(*stored(model, ids(30)))
    assert cache.fetch([498] + ids(10)) == (None, 0)
    assert PromptCache(1 << 30).fetch(ids(10)) == (None, 0)


def test_the_longest_match_wins(model):
    cache = PromptCache(1 << 30)
    short, short_caches = stored(model, ids(10))
    long, long_caches = stored(model, ids(30, salt=5))
    cache.insert(short, short_caches)
    cache.insert(long, long_caches)
    assert cache.fetch(long[:20] + [1])[1] == 20
    assert cache.fetch(short + [1])[1] == len(short)


def test_a_sequence_that_extends_a_stored_one_replaces_it(model):
    cache = PromptCache(1 << 30)
    first, first_caches = stored(model, ids(30))
    cache.insert(first, first_caches)
    reply, longer_caches = run(model, first + [11, 12], 3, cache.fetch(first + [11, 12])[0])
    cache.insert(first + [11, 12] + reply, longer_caches)
    assert len(cache) == 1 and cache.nbytes == longer_caches.nbytes
    # A prefix of what is stored adds nothing.
    cache.insert(first[:10], cache.fetch(first[:11])[0])
    assert len(cache) == 1


def test_eviction_keeps_the_bytes_under_the_cap_dropping_the_least_recently_used(model):
    sequences = [stored(model, ids(60, salt=s)) for s in (1, 2, 3)]  # 64 positions: a 20-token hit leaves a long tail
    each = sequences[0][1].nbytes
    assert all(c.nbytes == each for _, c in sequences)
    cache = PromptCache(2 * each)
    cache.insert(*sequences[0])
    cache.insert(*sequences[1])
    assert cache.fetch(sequences[0][0][:20] + [1])[1] == 20  # 0 is now the most recently used (and kept)
    cache.insert(*sequences[2])
    assert len(cache) == 2 and cache.nbytes == 2 * each <= cache.max_bytes
    assert cache.fetch(sequences[1][0] + [1]) == (None, 0)
    assert cache.fetch(sequences[0][0] + [1])[1] == 64 and cache.fetch(sequences[2][0] + [1])[1] == 64


def test_a_sequence_larger_than_the_cap_is_not_kept(model):
    tokens, caches = stored(model, ids(30))
    cache = PromptCache(caches.nbytes - 1)
    cache.insert(tokens, caches)
    assert len(cache) == 0 and cache.nbytes == 0


def test_size_0_keeps_nothing(model):
    cache = PromptCache(0)
    cache.insert(*stored(model, ids(30)))
    assert len(cache) == 0 and cache.fetch(ids(30)) == (None, 0)


def test_caches_that_do_not_hold_the_tokens_given_are_refused(model):
    tokens, caches = stored(model, ids(30))
    with pytest.raises(ValueError, match="hold 34 positions, not the 33"):
        PromptCache(1 << 30).insert(tokens[:-1], caches)


def test_a_running_request_never_changes_a_stored_sequence(model):
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(40))
    cache.insert(tokens, caches)
    follow_up = tokens[:8] + ids(30, salt=9)  # leaves a tail longer than HAND_OVER_TAIL: the hit is a copy
    hit, _ = cache.fetch(follow_up)
    written, _ = run(model, follow_up, 8, hit)  # writes positions 20.. of its copy
    # The entry still holds the first sequence: the same request gives the same tokens again.
    assert run(model, follow_up, 8, cache.fetch(follow_up)[0])[0] == written
    cold = run(model, tokens + [4], 6)[0]
    assert run(model, tokens + [4], 6, cache.fetch(tokens + [4])[0])[0] == cold


def test_the_generator_refuses_a_start_cache_that_leaves_no_prompt_token_to_run(model):
    tokens, caches = stored(model, ids(10))
    with pytest.raises(ValueError, match="must hold fewer than the prompt's 14"):
        _core.Generator(model.decoder, tokens, sampler_options(GREEDY), 512, -1, caches)


def test_a_generator_that_refuses_its_prompt_leaves_the_start_caches_with_the_caller(model):
    """The generator takes the caches only once every argument has passed its checks: a bad token id must not lose
    the conversation the prompt cache handed over."""
    tokens, caches = stored(model, ids(20))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _core.Generator(model.decoder, tokens + [10 ** 6], sampler_options(GREEDY), 512, -1, caches)
    assert caches.length == len(tokens) and caches.writes_in_place
    follow_up = tokens + [7, 8]
    assert run(model, follow_up, 4, caches)[0] == run(model, follow_up, 4)[0]


def test_a_batch_that_refuses_a_row_leaves_its_caches_with_the_caller(model):
    """BatchGenerator.add takes a prefilled row's caches as the Generator does: refused (a token id the model
    lacks), they are whole again in the caller's object, and an add with them then decodes as one with fresh caches."""
    prompt = ids(12)
    caches = prefilled(model.decoder, prompt, sampler_options(GREEDY), 512)
    batch = _core.BatchGenerator(model.decoder)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batch.add(prompt[:-1] + [10 ** 6], sampler_options(GREEDY), -1, caches)
    assert caches.length == len(prompt) - 1 and len(batch) == 0
    assert batched_tokens(model, prompt, caches) == batched_tokens(
        model, prompt, prefilled(model.decoder, prompt, sampler_options(GREEDY), 512))
    assert caches.length == 0  # taken by the add that succeeded


def batched_tokens(model, prompt: list[int], caches, n: int = 4) -> list[int]:
    batch = _core.BatchGenerator(model.decoder)
    row = batch.add(prompt, sampler_options(GREEDY), -1, caches)
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += [token for row_id, token in batch.step() if row_id == row]
    return tokens


def test_a_request_refused_after_a_hand_over_gives_the_conversation_back(model):
    """Through LanguageModel.stream: the follow-up of a stored conversation with a token id the model lacks is
    refused, and the conversation (handed over to it) is back in the cache, whole but for its unshared tail."""
    model.prompt_cache.clear()
    greedy = Options(temperature=0.0, repeat_penalty=1.0, num_predict=2)
    list(model.stream(ids(40), greedy))
    (stored_tokens,) = model.prompt_cache.sequences()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(model.stream(stored_tokens + [10 ** 6], greedy))
    assert model.prompt_cache.sequences() == [stored_tokens]
    out = list(model.stream(stored_tokens + [7], greedy))
    assert out[-1].prompt_cache_count == len(stored_tokens)
    model.prompt_cache.clear()


def test_a_batched_request_refused_after_a_hand_over_gives_the_conversation_back(model):
    """The same through the batch scheduler (requests as the server runs them: jobs of the worker, members of the
    model's batch), where the generator is made on the batch's thread."""
    import asyncio

    from mlxrunner.worker import Worker

    greedy = Options(temperature=0.0, repeat_penalty=1.0, num_predict=2)

    async def main():
        worker = Worker()
        try:
            def job(prompt):
                return lambda ctx: list(model.stream(prompt, greedy))

            await worker.submit("first", job(ids(40)), batch=model.batch).wait()
            (stored_tokens,) = model.prompt_cache.sequences()
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await worker.submit("refused", job(stored_tokens + [10 ** 6]), batch=model.batch).wait()
            assert model.prompt_cache.sequences() == [stored_tokens]
            out = await worker.submit("next", job(stored_tokens + [7]), batch=model.batch).wait()
            assert out[-1].prompt_cache_count == len(stored_tokens)
        finally:
            worker.stop()

    model.prompt_cache.clear()
    asyncio.run(main())
    model.prompt_cache.clear()


def test_take_back_keeps_whole_caches_only(model):
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(20))
    cache.take_back(tokens + [1, 2], caches)  # a request's prompt; the caches hold its first 24 tokens
    assert cache.sequences() == [tokens]
    _core.Generator(model.decoder, tokens + [3], sampler_options(GREEDY), 512, -1, caches)  # takes them
    cache.clear()
    cache.take_back(tokens + [3], caches)
    cache.take_back(tokens, None)
    assert len(cache) == 0


def test_a_sequence_the_prompt_extends_is_handed_over_and_written_in_place(model):
    """A chat's next turn takes the stored sequence itself (it leaves the cache; the turn's own sequence replaces it
    when done), so its follow-up writes into the stored buffers: no layer's buffer is copied; so does a prompt that
    leaves a short tail of it unshared (trimmed). A sequence shared only in part, with a long tail, stays stored, and
    the request's copy pays a copy of each buffer at its first write. (1,000 positions: buffers that dwarf a 3-token
    forward's activations.)"""
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(1000))
    nbytes = caches.nbytes
    cache.insert(tokens, caches)
    del caches

    def follow_up_peak(prompt: list[int], alone: bool) -> int:
        hit, reused = cache.fetch(prompt)
        assert reused > 0
        # What decides, on CUDA, whether the attention kernels write the follow-up's keys into the buffers
        # themselves (KVCache::writes_in_place): no copy may share them, the trim included.
        assert hit.writes_in_place == alone
        # max_tokens 1: the forward alone. (A pipelined next step, dispatched while the forward runs, would find a
        # buffer held by the work in flight on a GPU and copy it, where the kernels that write in place do not apply:
        # the tiny model's heads are 16 wide.)
        generator = _core.Generator(model.decoder, prompt, sampler_options(GREEDY), 512, -1, hit, 1)
        assert hit.length == 0  # the generator took the caches: it is their only holder
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        next(generator)
        mx.synchronize()
        # Its own buffers after the step either way: a copy's first write replaced them (MLX copied).
        assert generator.take_cache().writes_in_place
        return mx.get_peak_memory() - before

    handed_over = follow_up_peak(tokens + [7, 8, 9], alone=True)
    assert len(cache) == 0
    cache.insert(*stored(model, ids(1000)))
    # the stored sequence's 4 generated tokens not sent back
    trimmed = follow_up_peak(ids(1000) + [7, 8, 9], alone=True)
    assert len(cache) == 0
    cache.insert(*stored(model, ids(1000)))
    copied = follow_up_peak(ids(750) + [7, 8, 9], alone=False)  # shares 750 of the stored sequence's positions
    assert len(cache) == 1
    assert copied >= nbytes  # every layer's buffers copied at the first write
    # Half the buffers' bytes: the forward's own arrays, which on CUDA MLX's allocator rounds up (152,176 bytes on an
    # H100 against 524,288 of buffers), far below the copy's
    assert handed_over < nbytes / 2 and trimmed < nbytes / 2


def test_a_chat_turn_through_stream_writes_the_stored_buffers_in_place(model):
    """The same through LanguageModel.stream: the turn's generator must be the caches' only holder."""
    model.prompt_cache.clear()
    list(model.stream(ids(1000), Options(temperature=0.0, repeat_penalty=1.0, num_predict=4)))
    (stored_tokens,) = model.prompt_cache.sequences()
    nbytes = model.prompt_cache.nbytes
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = list(model.stream(stored_tokens + [7, 8], Options(temperature=0.0, repeat_penalty=1.0, num_predict=1)))
    mx.synchronize()
    assert out[-1].prompt_cache_count == len(stored_tokens)
    assert mx.get_peak_memory() - before < nbytes / 4
    model.prompt_cache.clear()


def test_the_stored_sequences_checks_leave_it_free_to_be_written_in_place(model):
    """insert() asks whether a stored sequence covers the new one or the new one covers it, by trimming in
    thought (can_trim): a trial trim on a copy would leave both sides marked as sharing their buffers, and the
    sequence handed over later would never be written in place on CUDA."""
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(40))
    cache.insert(tokens, caches)
    _, prefix_caches = run(model, tokens[:30], 1)
    assert prefix_caches.trim(1) and prefix_caches.writes_in_place
    cache.insert(tokens[:30], prefix_caches)  # covered by the first: not kept
    longer, longer_caches = stored(model, tokens + [5])  # covers the first: replaces it
    cache.insert(longer, longer_caches)
    assert cache.sequences() == [longer]
    hit, reused = cache.fetch(longer + [6])
    assert reused == len(longer) and hit.writes_in_place


def test_a_sequence_given_back_from_another_thread_goes_in_at_the_owners_next_call(model):
    cache = PromptCache(1 << 30)
    tokens, caches = stored(model, ids(40))
    giver = threading.Thread(target=cache.give_back, args=(tokens, caches))
    giver.start()
    giver.join()
    hit, reused = cache.fetch(tokens + [1])
    assert reused == len(tokens) and hit.length == reused
