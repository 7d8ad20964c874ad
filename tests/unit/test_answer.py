"""`Answer` (llm/answer.py), the text side of a generation, fed token ids by hand: no model runs.

With the tiny Qwen3's real tokenizer: an end-of-sequence token ends the answer uncounted; the token budget ends it
with the reason the client can act on (its num_predict, or the model's context); a stop string split across tokens
is cut out of the text; logprobs come before the text their token makes; the text is the tokenizer's own decoding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxrunner import store
from mlxrunner.llm.answer import Answer, Completion, TokenLogprob
from mlxrunner.request import Options
from mlxrunner.text.tokenizer import TextTokenizer

QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"
TEXT = "Hello world, the weather is fine today."
EOS = 9999  # stands for the model's end-of-sequence token


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_source(store.resolve(str(QWEN3)))


def answer(tokenizer, *, context=100, prompt=(1, 2, 3), top_logprobs=None, **options) -> Answer:
    return Answer(tokenizer, context, list(prompt), Options(**options), {EOS}, top_logprobs)


def feed(answer: Answer, ids: list[int]) -> list:
    items = []
    for token in ids:
        if answer.done:
            break
        items += answer.push(token, None)
    return items + answer.finish()


def text_of(items) -> str:
    return "".join(item for item in items if isinstance(item, str))


def test_the_text_is_the_tokenizers_decoding_and_eos_ends_it_uncounted(tokenizer):
    ids = tokenizer.encode(TEXT, add_bos=False)
    items = feed(answer(tokenizer), [*ids, EOS, *ids])
    final = items[-1]
    assert isinstance(final, Completion)
    assert text_of(items) == tokenizer.decode(ids)
    assert (final.done_reason, final.stop_reason) == ("stop", f"eos:{EOS}")
    assert final.eval_count == len(ids) and final.prompt_eval_count == 3


def test_the_budget_names_num_predict_or_the_context(tokenizer):
    ids = tokenizer.encode(TEXT, add_bos=False)
    by_request = feed(answer(tokenizer, num_predict=3), ids)[-1]
    assert (by_request.done_reason, by_request.stop_reason, by_request.eval_count) == ("length", "num_predict", 3)
    by_context = feed(answer(tokenizer, context=5, num_predict=50), ids)[-1]  # 3 prompt tokens: room for 2
    assert (by_context.done_reason, by_context.stop_reason, by_context.eval_count) == ("length", "context", 2)
    nothing = answer(tokenizer, num_predict=0)
    assert nothing.done
    assert nothing.finish()[-1].stop_reason == "num_predict"


def test_a_stop_string_across_tokens_is_cut_out(tokenizer):
    ids = tokenizer.encode(TEXT, add_bos=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert len(pieces) > 4 and all(pieces), pieces  # the stop below must span a token boundary
    stop = pieces[2][-1] + pieces[3][:2]  # the end of one token and the start of the next
    full = tokenizer.decode(ids)
    items = feed(answer(tokenizer, stop=[stop]), ids)
    assert text_of(items) == full[:full.index(stop)]
    assert (items[-1].done_reason, items[-1].stop_reason) == ("stop", f"stop:{stop}")


def test_logprobs_come_before_the_text_of_their_token(tokenizer):
    ids = tokenizer.encode(TEXT, add_bos=False)[:3]
    given = answer(tokenizer, top_logprobs=1)
    items = []
    for token in ids:
        items += given.push(token, (-0.5, [(token, -0.5)]))
    logprobs = [item for item in items if isinstance(item, TokenLogprob)]
    assert [lp.token for lp in logprobs] == [tokenizer.token_bytes(i) for i in ids]
    assert logprobs[0].top == [(tokenizer.token_bytes(ids[0]), -0.5)]
    assert isinstance(items[0], TokenLogprob)  # the first token's logprob, then its text
