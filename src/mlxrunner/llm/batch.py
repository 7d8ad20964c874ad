"""Continuous batching: the LLM requests that arrive while others decode join them, one forward per step.

The worker (worker.py) runs each text-generation job of a batching model on a thread of its own, up to
`max_jobs` at once; the job's code is the same as when it runs alone, and its `LanguageModel.stream` hands
the request to this scheduler (`stream`) and relays what comes back. All MLX work stays on the worker's
thread, which calls `step()` while such jobs live. A step:

1. takes new requests in: the prompt cache's closest sequence, and a `_core.Generator` to prefill the rest;
2. cancels what was cancelled (the client left): the row leaves, its caches go to the prompt cache;
3. prefills up to one chunk's worth of prompt tokens (`prefill_chunk`), oldest request first, so that the
   others keep decoding meanwhile: a long prompt takes a chunk a step, a burst of short ones all fit in one
   step; a request whose prefill is done joins the batch (`_core.BatchGenerator.add`);
4. decodes one token of every row in one forward; each token goes through the request's own `Answer` (EOS,
   budget, stop strings, UTF-8, logprobs), and a finished row leaves with its caches.

Each row samples with its own options and seed and sees only its own keys, so its tokens are the ones it
would get alone (BatchKVCache in csrc/text/kv_cache.h says why the arithmetic is the same; a sliding-window layer's
rows keep their rotating caches' layouts). Models with latent attention (MLA) or attention sinks (GPT-OSS) do not
batch (`_core.Decoder.can_batch`): their requests run one at a time as before.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from mlxrunner import _core
from mlxrunner.errors import Cancelled

if TYPE_CHECKING:
    import mlx.core as mx

    from mlxrunner.llm.answer import Answer, Completion, TokenLogprob
    from mlxrunner.llm.prompt_cache import PromptCache

log = logging.getLogger(__name__)

_END = object()  # the last item of a request's stream
IDLE_WAIT_S = 0.05  # how long an idle step waits for a request before the worker looks at its queue again


@dataclass(eq=False)
class _Request:
    """One request in the scheduler: prefilling (generator set), then decoding (row set)."""

    answer: Answer
    options: _core.SamplerOptions
    check_cancelled: Callable[[], None] | None
    logit_bias: mx.array | None = None  # float32 [V], or none
    items: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # to the request's thread
    generator: _core.Generator | None = None
    row: int | None = None
    abandoned: bool = False  # its thread stopped reading (an exception there): it leaves as if cancelled

    @property
    def top_logprobs(self) -> int:
        return -1 if self.answer.top_logprobs is None else self.answer.top_logprobs


def prefilled(decoder: _core.Decoder, prompt: list[int], options: _core.SamplerOptions,
              prefill_chunk: int) -> _core.SequenceCache:
    """The caches of a prompt prefilled alone, a chunk at a time, ready to join a batch with its last token
    (`_core.BatchGenerator.add`)."""
    generator = _core.Generator(decoder, prompt, options, prefill_chunk, -1)
    while generator.prefill_chunk() > 0:
        pass
    return generator.take_cache()


class BatchScheduler:
    """The requests of one LanguageModel decoding together (the worker's `Batch`)."""

    def __init__(self, decoder: _core.Decoder, prompt_cache: PromptCache, max_jobs: int, prefill_chunk: int):
        self.decoder = decoder
        self.prompt_cache = prompt_cache  # where each request starts from, and where its caches go when it leaves
        self.max_jobs = max_jobs
        self.prefill_chunk = prefill_chunk
        self._batch = _core.BatchGenerator(decoder)
        self._inbox: collections.deque[_Request] = collections.deque()
        self._wakeup = threading.Condition()
        self._prefilling: collections.deque[_Request] = collections.deque()
        self._rows: dict[int, _Request] = {}
        self._thread_role = threading.local()

    def __len__(self) -> int:
        """The sequences in the batch now."""
        return len(self._batch)

    def waiting(self) -> int:
        """Requests sent that no step has taken in yet."""
        with self._wakeup:
            return len(self._inbox)

    # --- the requests' threads --------------------------------------------------------------------

    def serve(self, job: Callable[[], None]) -> None:
        """Run a job on the calling thread as a member of the batch (its stream() comes here)."""
        self._thread_role.member = True
        try:
            job()
        finally:
            self._thread_role.member = False

    def serves_this_thread(self) -> bool:
        return getattr(self._thread_role, "member", False)

    def wake(self) -> None:
        """Cut an idle step's wait short: a request or a job has arrived."""
        with self._wakeup:
            self._wakeup.notify_all()

    def stream(self, answer: Answer, options: _core.SamplerOptions, check_cancelled: Callable[[], None] | None,
               logit_bias: mx.array | None = None) -> Iterator[str | TokenLogprob | Completion]:
        """What LanguageModel.stream yields, computed on the worker's thread in the batch."""
        request = _Request(answer, options, check_cancelled, logit_bias)
        with self._wakeup:
            self._inbox.append(request)
            self._wakeup.notify_all()
        try:
            while (item := request.items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.abandoned = True  # read on the worker's thread; a finished request is gone by now

    # --- the worker's thread ----------------------------------------------------------------------

    def warm_up(self) -> None:
        """Two decode steps of a batch of each row count up to _core.MATVEC_MAX_ROWS (the products of those rows
        take our CUDA decode kernel, the others MLX's) and of `max_jobs` rows (the kernels of a step depend on its rows;
        a GPU loads each variant on first use). Nothing is kept."""
        greedy = _core.SamplerOptions.from_dict({"temperature": 0.0, "repeat_penalty": 1.0})
        for rows in sorted({*range(2, min(self.max_jobs, _core.MATVEC_MAX_ROWS) + 1), self.max_jobs}):
            ids = [self._batch.add([0, 0], greedy, -1, prefilled(self.decoder, [0, 0], greedy, self.prefill_chunk))
                   for _ in range(rows)]
            self._batch.step()
            self._batch.step()
            for row in ids:
                self._batch.remove(row)

    def step(self) -> None:
        """One step of the batch's MLX work, or a short wait when there is none."""
        self._take_new_requests()
        self._drop_cancelled()
        self._prefill_some()
        if self._rows:
            self._decode()
        elif not self._prefilling:
            with self._wakeup:
                if not self._inbox:
                    self._wakeup.wait(IDLE_WAIT_S)

    def _take_new_requests(self) -> None:
        with self._wakeup:
            new, self._inbox = list(self._inbox), collections.deque()
        for request in new:
            ids = request.answer.ids
            cached = None
            try:
                cached, request.answer.result.prompt_cache_count = self.prompt_cache.fetch(ids)
                # max_tokens 1: the generator gives the first token and dispatches nothing after it (_prefill).
                request.generator = _core.Generator(self.decoder, ids, request.options, self.prefill_chunk,
                                                    request.top_logprobs, cached, 1, logit_bias=request.logit_bias)
            except Exception as exc:  # noqa: BLE001 - the request's error, raised on its own thread
                self.prompt_cache.take_back(ids, cached)
                request.items.put(exc)
                continue
            self._prefilling.append(request)

    def _drop_cancelled(self) -> None:
        for request in [*self._prefilling, *self._rows.values()]:
            try:
                if request.abandoned:
                    raise Cancelled("the request's stream was closed")
                if request.check_cancelled:
                    request.check_cancelled()
            except Cancelled as exc:
                self._leave(request, exc)

    def _prefill_some(self) -> None:
        """Prefill prompt tokens up to one chunk's worth (a request's chunk may pass what is left), oldest request
        first. One request a step made a burst of N short prompts join over N steps: of 64 streams arriving
        together, the last joined 63 steps after the first (a third of a 128-token run's steps)."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            budget -= max(1, self._prefill(self._prefilling[0]))

    def _prefill(self, request: _Request) -> int:
        """The request's next chunk; returns how many prompt tokens it prefilled. The last chunk also gives the first
        token, as a lone run computes it (Generator.__next__: the rest of the prompt in one forward); the row then
        joins the batch with that token as its first input (BatchGenerator.join)."""
        generator, token = request.generator, None
        before = generator.position
        try:
            if request.answer.done:  # nothing to generate (num_predict 0): the prompt only fills the cache
                last = generator.prefill_chunk() == 0
            elif generator.prompt_left > self.prefill_chunk:
                generator.prefill_chunk()
                last = False
            else:
                token, last = next(generator), True
        except Exception as exc:  # noqa: BLE001 - the request's error, raised on its own thread
            self._prefilling.remove(request)
            request.items.put(exc)
            return 0
        prefilled = generator.position - before
        if not last:
            return prefilled
        self._prefilling.popleft()
        try:
            if token is not None:
                for item in request.answer.push(token, generator.logprobs):
                    request.items.put(item)
            if request.answer.done:
                self._finish(request)
                return prefilled
            request.row = self._batch.join(generator)
        except Exception as exc:  # noqa: BLE001 - the request's error, raised on its own thread
            self._leave(request, exc)
            return prefilled
        request.generator = None
        self._rows[request.row] = request
        return prefilled

    def _decode(self) -> None:
        try:
            tokens = self._batch.step()
        except Exception as exc:  # noqa: BLE001 - a fault of the whole step: every row gets it, the batch restarts
            log.exception("a batched decode step failed")
            for request in self._rows.values():
                request.items.put(exc)
            self._rows.clear()
            self._batch = _core.BatchGenerator(self.decoder)
            return
        for row, token in tokens:
            request = self._rows[row]
            try:
                logprobs = self._batch.logprobs(row) if request.top_logprobs >= 0 else None
                for item in request.answer.push(token, logprobs):
                    request.items.put(item)
                if request.answer.done:
                    self._finish(request)
            except Exception as exc:  # noqa: BLE001 - the request's error, raised on its own thread
                self._leave(request, exc)  # (its caches, unless it already handed them over)

    def _finish(self, request: _Request) -> None:
        self._take_caches(request)
        for item in request.answer.finish():
            request.items.put(item)
        request.items.put(_END)

    def _leave(self, request: _Request, error: BaseException) -> None:
        self._take_caches(request)
        request.items.put(error)

    def _take_caches(self, request: _Request) -> None:
        """The request leaves: what it computed goes to the prompt cache (a cancelled request sent again resumes
        from it)."""
        tokens = request.answer.ids + request.answer.generated
        if request.row is not None:
            held = self._batch.position(request.row)
            self.prompt_cache.keep(tokens, held, self._batch.remove(request.row))
            del self._rows[request.row]
            request.row = None
        elif request.generator is not None:
            if request in self._prefilling:
                self._prefilling.remove(request)
            self.prompt_cache.keep(tokens, request.generator.position, request.generator.take_cache())
            request.generator = None
