"""The prompt cache benchmark's two sides, shared by benchmarks/cpu/test_prompt_cache.py and
benchmarks/gpu/prompt_cache_bench.py: a first request on an empty cache, then a second whose prompt is the
first's plus a follow-up.

- ours: `LanguageModel.stream` (what a /completion request runs: prompt cache fetch, prefill of the rest,
  the first token, the caches handed back), greedy, one token.
- mlx-lm: what its server does per request: `LRUPromptCache.fetch_nearest_cache`, `generate_step` over the
  rest with that cache (or a fresh one), one greedy token, `insert_cache` of prompt + token.

Both prefill in chunks of `PREFILL_CHUNK`. A request's time is its wall time, cache bookkeeping included, up
to the device being idle again.

Import `mlxrunner` before this module (the benchmarks' conftest and scripts do): it routes MLX's CPU BLAS to
OpenBLAS before `mlx.core` loads.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import mlx.core as mx

from mlxrunner import store
from mlxrunner.llm.answer import Completion, TokenLogprob
from mlxrunner.llm.model import PREFILL_CHUNK, LanguageModel
from mlxrunner.request import Options

SIDES = ["ours", "mlx-lm"]


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(17 * i + 3 + salt) % 499 for i in range(n)]


class Ours:
    def __init__(self, folder: Path):
        self.model = LanguageModel(store.resolve(str(folder)))

    def clear(self) -> None:
        self.model.prompt_cache.clear()

    def request(self, ids: list[int]) -> tuple[float, bytes, int]:
        """(seconds, the first token's bytes, prompt tokens that came from the cache)."""
        started = time.perf_counter()
        items = list(self.model.stream(ids, Options(temperature=0.0, repeat_penalty=1.0, num_predict=1),
                                       top_logprobs=0))
        mx.synchronize()  # the step the loop dispatched after the token
        seconds = time.perf_counter() - started
        done = items[-1]
        assert isinstance(done, Completion) and done.prompt_eval_count == len(ids)
        first = [x for x in items if isinstance(x, TokenLogprob)]
        return seconds, first[0].token if first else b"<eos>", done.prompt_cache_count


class Peer:
    MODEL_KEY = "bench"

    def __init__(self, folder: Path):
        import mlx_lm

        cache = importlib.import_module("mlx_lm.models.cache")
        self._make_prompt_cache, self._lru = cache.make_prompt_cache, cache.LRUPromptCache
        self._generate = importlib.import_module("mlx_lm.generate")
        self.model, self.tokenizer = mlx_lm.load(str(folder))
        self.cache = self._lru()

    def clear(self) -> None:
        self.cache = self._lru()

    def request(self, ids: list[int]) -> tuple[float, bytes, int]:
        from mlx_lm.sample_utils import make_sampler

        started = time.perf_counter()
        cache, rest = self.cache.fetch_nearest_cache(self.MODEL_KEY, ids)
        if cache is None:
            cache = self._make_prompt_cache(self.model)
        steps = self._generate.generate_step(mx.array(rest), self.model, prompt_cache=cache, max_tokens=1,
                                             sampler=make_sampler(temp=0.0), prefill_step_size=PREFILL_CHUNK)
        (token, _), = list(steps)
        self.cache.insert_cache(self.MODEL_KEY, ids + [token], cache)
        mx.synchronize(self._generate.generation_stream)
        seconds = time.perf_counter() - started
        return seconds, self.tokenizer.decode([token]).encode(), len(ids) - len(rest)


def side(name: str, folder: Path) -> Ours | Peer:
    return (Ours if name == "ours" else Peer)(folder)

