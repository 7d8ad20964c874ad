"""LLM prefill and decode: our C++ loop against mlx-lm 0.32.2 on the same weights, same MLX, same run.

Both sides are timed as raw token loops, without detokenization: ours is `_core.Generator`
(chunked prefill, one-ahead pipelined decode, C++ sampler), mlx-lm's is `generate_step` (the loop
under its `stream_generate`). Time to first token = prefill; decode tok/s = the tokens after the
first over the time after the first. The greedy token ids of both must agree.
"""

from __future__ import annotations

import importlib
import time

import mlx.core as mx
import pytest

from benchmarks.llm_models import TINY, qwen3_06b
from mlxrunner import _core
from mlxrunner.llm import load
from mlxrunner.llm.model import sampler_options
from mlxrunner.protocol import Options

mlx_lm = pytest.importorskip("mlx_lm", reason="the peer, mlx-lm, is not installed")
from mlx_lm.sample_utils import make_sampler  # noqa: E402

generate_step = importlib.import_module("mlx_lm.generate").generate_step

RESULTS: dict[tuple[str, str], dict] = {}

CASES = {
    # name: (model folder factory, prompt tokens, decode tokens)
    "tiny": (lambda: TINY, 256, 256),
    "qwen3-0.6b-bf16": (lambda: qwen3_06b("bfloat16"), 128, 16),
    "qwen3-0.6b-f32": (lambda: qwen3_06b("float32"), 128, 16),
}
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.9)

_loaded: dict[str, tuple] = {}


def models(case: str):
    if case not in _loaded:
        folder = CASES[case][0]()
        ours = load(str(folder))
        peer, _ = mlx_lm.load(str(folder))
        _loaded[case] = (ours, peer)
    return _loaded[case]


def prompt(n: int) -> list[int]:
    return [(17 * i + 3) % 499 for i in range(n)]


def run_ours(model, ids, n, sampling):
    options = sampler_options(Options(**(SAMPLING if sampling else {"temperature": 0.0}), repeat_penalty=1.0,
                                      seed=1))
    start = time.perf_counter()
    generator = _core.Generator(model.decoder, ids, options, 512)
    tokens = [next(generator)]
    first = time.perf_counter()
    tokens += [next(generator) for _ in range(n - 1)]
    return tokens, first - start, time.perf_counter() - first


def run_peer(model, ids, n, sampling):
    sampler = make_sampler(temp=SAMPLING["temperature"], top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"]) \
        if sampling else make_sampler(temp=0.0)
    start = time.perf_counter()
    tokens, first = [], None
    for token, _ in generate_step(mx.array(ids), model, max_tokens=n, sampler=sampler, prefill_step_size=512):
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
    return tokens, first - start, time.perf_counter() - first


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("side", ["ours", "mlx-lm"])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode(benchmark, case, side, sampling):
    if sampling and case != "tiny":
        pytest.skip("sampling overhead is measured on the tiny model, where it is visible")
    ours, peer = models(case)
    _, n_prompt, n_decode = CASES[case]
    ids = prompt(n_prompt)
    run = run_ours if side == "ours" else run_peer
    model = ours if side == "ours" else peer
    run(model, ids, min(n_decode, 4), sampling)  # warm-up
    rounds = 3 if case == "tiny" else 2
    result = benchmark.pedantic(lambda: run(model, ids, n_decode, sampling), rounds=rounds, iterations=1)
    tokens, ttft, decode_s = result
    RESULTS[(case + ("/sampling" if sampling else ""), side)] = {
        "tokens": tokens, "prefill_tps": n_prompt / ttft, "ttft_ms": 1000 * ttft,
        "decode_tps": (len(tokens) - 1) / decode_s}
    benchmark.extra_info.update(RESULTS[(case + ("/sampling" if sampling else ""), side)] | {"tokens": None})
    other = RESULTS.get((case + ("/sampling" if sampling else ""), "ours" if side == "mlx-lm" else "mlx-lm"))
    if other and not sampling and "bf16" not in case:
        assert tokens == other["tokens"], "greedy tokens differ between ours and mlx-lm"


def pytest_terminal_summary_llm(write):
    if not RESULTS:
        return
    write("\nLLM: ours (mlxrunner C++ loop) vs mlx-lm 0.32.2 generate_step, same weights and MLX build")
    write(f"{'case':<24}{'prefill tok/s ours':>20}{'mlx-lm':>10}{'ratio':>8}{'decode tok/s ours':>20}"
          f"{'mlx-lm':>10}{'ratio':>8}{'agree':>8}")
    for case in dict.fromkeys(k[0] for k in RESULTS):
        o, p = RESULTS.get((case, "ours")), RESULTS.get((case, "mlx-lm"))
        if not (o and p):
            continue
        agree = sum(a == b for a, b in zip(o["tokens"], p["tokens"]))
        write(f"{case:<24}{o['prefill_tps']:>20.1f}{p['prefill_tps']:>10.1f}{o['prefill_tps'] / p['prefill_tps']:>7.2f}x"
              f"{o['decode_tps']:>20.1f}{p['decode_tps']:>10.1f}{o['decode_tps'] / p['decode_tps']:>7.2f}x"
              f"{agree:>5}/{len(o['tokens'])}")
