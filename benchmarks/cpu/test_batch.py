"""Batched decoding on the CPU: the aggregate throughput of 1, 4 and 8 concurrent streams against one real runner
subprocess, against our own single stream (and, on the tiny models at 8 streams, the runner decoding one request at a
time): the tiny Qwen3, the tiny Gemma 3 (sliding-window layers) and a 0.6B Qwen3.

    python -m pytest benchmarks/cpu/test_batch.py -q      # ~5 minutes on 2 cores (the 0.6B model built once)

Each case sends N greedy `/v1/completions` at once (benchmarks/batch_serving.py; different prompts) and times
the round, from the first request to the last answer. Correctness while timing: stream i's text is the same at
every level of concurrency, and the same as when the runner decodes one request at a time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import pytest

from benchmarks.batch_serving import Server, prompts
from benchmarks.cpu.llm_models import GEMMA3_TINY, TINY, qwen3_06b

STREAMS = [1, 4, 8]


@dataclass(frozen=True)
class Case:
    folder: Callable
    tokens: int  # per stream
    rounds: int
    warmup_rounds: int


# The 0.6B model is kept short: each request's ~30-token prompt is prefilled on its own before it joins.
# gemma3-tiny: sliding-window layers (window 8, every other layer), which batch in their rotating layouts.
CASES = {"tiny": Case(lambda: TINY, 64, 5, 1), "gemma3-tiny": Case(lambda: GEMMA3_TINY, 64, 5, 1),
         "qwen3-0.6b-f32": Case(lambda: qwen3_06b("float32"), 8, 1, 1)}
MODES = {"batched": None, "one at a time": 1}  # --max-batch

_servers: dict[tuple[str, str], Server] = {}
TOK_S: dict[tuple[str, str, int], float] = {}  # (case, mode, streams) -> median aggregate tok/s
TEXTS: dict[tuple[str, int], list[str]] = {}  # (case, streams) -> each stream's text


@pytest.fixture(scope="module", autouse=True)
def stop_servers():
    yield
    for server in _servers.values():
        server.stop()


def server(case: str, mode: str) -> Server:
    if (case, mode) not in _servers:
        _servers[(case, mode)] = Server.start("ours", CASES[case].folder(), max(STREAMS), max_batch=MODES[mode])
    return _servers[(case, mode)]


def check_texts(case: str, streams: int, texts: list[str]) -> None:
    """Stream i's greedy text never depends on how many others decode beside it, nor on batching."""
    for (c, n), seen in TEXTS.items():
        if c == case:
            shared = min(n, streams)
            assert texts[:shared] == seen[:shared], f"{case}: {streams} streams changed a text seen at {n}"
    TEXTS[(case, streams)] = texts


@pytest.mark.parametrize("streams", STREAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_batched(benchmark, case, streams):
    run(benchmark, case, "batched", streams)


@pytest.mark.parametrize("case", ["tiny", "gemma3-tiny"])
def test_one_at_a_time(benchmark, case):
    run(benchmark, case, "one at a time", max(STREAMS))


def run(benchmark, case: str, mode: str, streams: int) -> None:
    c, s = CASES[case], server(case, mode)
    benchmark.group = f"batched decode, {case}: {streams} streams of {c.tokens} greedy tokens"
    rounds = []
    benchmark.pedantic(lambda: rounds.append(s.streams(prompts(streams), c.tokens)), rounds=c.rounds,
                       warmup_rounds=c.warmup_rounds, iterations=1)
    for r in rounds:
        assert r.tokens == streams * c.tokens
        check_texts(case, streams, r.texts)
    timed = rounds[c.warmup_rounds:]
    TOK_S[(case, mode, streams)] = statistics.median(r.tok_s for r in timed)
    benchmark.extra_info["aggregate_tok_s"] = round(TOK_S[(case, mode, streams)], 1)


def pytest_terminal_summary_batch(write) -> None:
    if not TOK_S:
        return
    write("")
    write("=" * 20 + " batched decode: aggregate tok/s of N concurrent streams (median round) " + "=" * 20)
    write(f"{'case':<18}{'mode':<16}{'streams':>8}{'tok/s':>10}{'vs 1 stream':>13}")
    for (case, mode, streams), tok_s in TOK_S.items():
        single = TOK_S.get((case, "batched", 1))
        ratio = f"{tok_s / single:.2f}x" if single else "-"
        write(f"{case:<18}{mode:<16}{streams:>8}{tok_s:>10.1f}{ratio:>13}")
