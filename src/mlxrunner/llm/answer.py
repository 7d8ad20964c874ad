"""What one generation gives back, a token at a time: the text, each token's logprobs, the final statistics.

`Answer` turns the generator's token ids into what a request streams; the lone decode loop
(`LanguageModel.stream`, llm/model.py) and the batch (llm/batch.py) both feed it, and the protocols
(http/) read its `TokenLogprob`s and `Completion`. Nothing here touches MLX.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection

from mlxrunner.text.detokenizer import StreamingDetokenizer
from mlxrunner.text.stop import StopMatcher

if TYPE_CHECKING:
    from mlxrunner.request import Options
    from mlxrunner.text.tokenizer import TextTokenizer


@dataclass
class Completion:
    """What one generation did, for the final line of the stream."""

    done_reason: str = "length"  # stop | length | cancel
    stop_reason: str = "num_predict"  # eos:<id> | stop:<text> | json | num_predict | context
    prompt_eval_count: int = 0  # the whole prompt, cached tokens included (as Ollama counts it)
    prompt_cache_count: int = 0  # how many of those came from the prompt cache
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0
    eval_duration: int = 0  # ns


@dataclass(frozen=True)
class TokenLogprob:
    """How likely the model found one generated token (natural log of its softmax over the raw logits, before
    penalties and temperature), and its most likely alternatives, best first."""

    token: bytes
    logprob: float
    top: list[tuple[bytes, float]]


class Answer:
    """The text side of one generation, a token at a time: EOS and end-of-turn tokens, the token budget, valid
    UTF-8 as tokens come (StreamingDetokenizer), stop strings (StopMatcher), logprobs, the final statistics.
    The lone decode loop (LanguageModel.stream) and the batch (llm/batch.py) both feed it."""

    def __init__(self, tokenizer: TextTokenizer, context_length: int, ids: list[int], options: Options,
                 eos_ids: Collection[int], top_logprobs: int | None):
        self._tokenizer = tokenizer
        self._context_length = context_length
        self.ids = ids
        self.eos_ids = eos_ids
        self.top_logprobs = top_logprobs
        self.budget = context_length - len(ids)
        if options.num_predict is not None and options.num_predict >= 0:
            self.budget = min(self.budget, options.num_predict)
        self.result = Completion(prompt_eval_count=len(ids))
        self.generated: list[int] = []  # every token the generator returned (its caches: ids + generated, or but
        # the last one when the budget ended the answer: Generator.position says how many)
        self.done = self.budget <= 0
        self._detok = StreamingDetokenizer(tokenizer)
        self._stops = StopMatcher(options.stop)
        self._start = time.perf_counter_ns()
        self._first_token_at: int | None = None
        self._ended_at: int | None = None

    def push(self, token: int, logprobs: tuple | None, json_complete: bool = False) -> list[str | TokenLogprob]:
        """The items a newly generated token yields; sets `done` once the answer has ended. json_complete: the
        answer is held to JSON and this token closed its object."""
        self.generated.append(token)
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter_ns()
            self.result.prompt_eval_duration = self._first_token_at - self._start
        items: list[str | TokenLogprob] = []
        if token in self.eos_ids:
            self._end("stop", f"eos:{token}")
            return items
        self.result.eval_count += 1
        if self.top_logprobs is not None:
            items.append(token_logprob(self._tokenizer, token, logprobs))
        emit, matched = self._stops.push(self._detok.add(token))
        if emit:
            items.append(emit)
        if matched is not None:
            self._end("stop", f"stop:{matched}")
        elif json_complete:
            self._end("stop", "json")
        elif len(self.generated) == self.budget:
            self._end("length", self._length_reason())
        return items

    def _length_reason(self) -> str:
        """Why an answer that ran out of tokens stopped: its num_predict, or the model's context."""
        return "num_predict" if self.budget < self._context_length - len(self.ids) else "context"

    def _end(self, done_reason: str, stop_reason: str) -> None:
        self.result.done_reason, self.result.stop_reason = done_reason, stop_reason
        self.done = True
        self._ended_at = time.perf_counter_ns()

    def finish(self) -> list[str | Completion]:
        """The text still held back, then the Completion."""
        if not self.generated:  # a budget of 0: nothing generated
            self.result.stop_reason = self._length_reason()
        items: list[str | Completion] = []
        if not self.result.stop_reason.startswith("stop:"):
            # Bytes the detokenizer still held can complete a stop string too.
            emit, matched = self._stops.push(self._detok.flush())
            if matched is not None:
                self.result.done_reason, self.result.stop_reason = "stop", f"stop:{matched}"
            tail = emit + ("" if matched is not None else self._stops.flush())
            if tail:
                items.append(tail)
        if self._first_token_at is not None:
            self.result.eval_duration = (self._ended_at or time.perf_counter_ns()) - self._first_token_at
        items.append(self.result)
        return items



def token_logprob(tokenizer: TextTokenizer, token: int,
                  logprobs: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
    """The generator's (logprob, [(id, logprob), ...]) of a token, with the tokens as their bytes."""
    logprob, top = logprobs
    as_bytes = tokenizer.token_bytes
    return TokenLogprob(as_bytes(token), logprob, [(as_bytes(i), lp) for i, lp in top])
