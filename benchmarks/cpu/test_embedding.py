"""Embedding throughput and start-up: ours (mlxrunner, MLX CPU) vs the peer (sentence-transformers, torch CPU).

Every throughput benchmark checks what it timed: ours against the peer's vectors (or, without the
peer, against the recorded goldens), the peer's against ours; cosine >= MIN_COSINE per input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from .conftest import (
    BATCH32_SHORT_CASE,
    N_SENTENCES,
    PEER_BATCH_SIZE,
    REFERENCE_BLAS_CASE,
    RESULTS,
    Record,
    check_agreement,
    record,
)

ROUNDS = 5
LONG_ROUNDS = 3
STARTUP_ROUNDS = 3
REFERENCE_BLAS_ROUNDS = 2


def _pedantic(benchmark, fn, rounds=ROUNDS):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


# --- 1. batch 1: 32 short sentences, one call each -------------------------------------------------


@pytest.mark.benchmark(group="batch1-short (32 x 1 sentence)")
def test_batch1_short_ours(benchmark, ours, short_texts, reference):
    vectors = _pedantic(benchmark, lambda: np.concatenate([ours.embed([t]).vectors for t in short_texts]))
    record(benchmark, "batch1-short (32 calls x 1)", "ours", len(short_texts))
    if reference is not None:
        check_agreement("batch1-short", vectors, reference["short"])


@pytest.mark.benchmark(group="batch1-short (32 x 1 sentence)")
def test_batch1_short_peer(benchmark, peer, ours, short_texts):
    vectors = _pedantic(benchmark, lambda: np.concatenate(
        [peer.encode([t], batch_size=PEER_BATCH_SIZE) for t in short_texts]))
    record(benchmark, "batch1-short (32 calls x 1)", "peer", len(short_texts))
    check_agreement("batch1-short", ours.embed(short_texts).vectors, vectors)


# --- 2. batch 32: one call of 32 short sentences; one call of 32 ~200-token texts ------------------


@pytest.mark.benchmark(group="batch32-short (1 x 32 sentences)")
def test_batch32_short_ours(benchmark, ours, short_texts, reference):
    vectors = _pedantic(benchmark, lambda: ours.embed(short_texts).vectors)
    record(benchmark, BATCH32_SHORT_CASE, "ours", len(short_texts))
    if reference is not None:
        check_agreement("batch32-short", vectors, reference["short"])


@pytest.mark.benchmark(group="batch32-short (1 x 32 sentences)")
def test_batch32_short_peer(benchmark, peer, ours, short_texts):
    vectors = _pedantic(benchmark, lambda: peer.encode(short_texts, batch_size=PEER_BATCH_SIZE))
    record(benchmark, BATCH32_SHORT_CASE, "peer", len(short_texts))
    check_agreement("batch32-short", ours.embed(short_texts).vectors, vectors)


@pytest.mark.benchmark(group="batch32-long (1 x 32 texts of ~200 tokens)")
def test_batch32_long_ours(benchmark, ours, long_texts, reference):
    tokens = [len(ids) for ids in ours.encode_ids(long_texts)[0]]
    benchmark.extra_info["tokens_min_max"] = [min(tokens), max(tokens)]
    vectors = _pedantic(benchmark, lambda: ours.embed(long_texts).vectors, rounds=LONG_ROUNDS)
    record(benchmark, "batch32-long (1 call x 32, ~200 tok)", "ours", len(long_texts))
    if reference is not None:
        check_agreement("batch32-long", vectors, reference["long"])


@pytest.mark.benchmark(group="batch32-long (1 x 32 texts of ~200 tokens)")
def test_batch32_long_peer(benchmark, peer, ours, long_texts):
    vectors = _pedantic(benchmark, lambda: peer.encode(long_texts, batch_size=PEER_BATCH_SIZE), rounds=LONG_ROUNDS)
    record(benchmark, "batch32-long (1 call x 32, ~200 tok)", "peer", len(long_texts))
    check_agreement("batch32-long", ours.embed(long_texts).vectors, vectors)


# --- why the OpenBLAS shim exists: the same batch-32 case on MLX's reference BLAS -----------------

REFERENCE_BLAS_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import mlxrunner
    assert mlxrunner.cpu_blas == "reference", mlxrunner.cpu_blas
    import numpy as np
    from mlxrunner import store
    from mlxrunner.embed.bert import BertEmbedder
    texts, rounds, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    embedder = BertEmbedder(store.resolve("all-minilm"))
    embedder.embed(texts[:2])  # warm-up (a full round would take as long as a timed one)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        vectors = embedder.embed(texts).vectors
        times.append(time.perf_counter() - start)
    np.save(out, vectors)
    print(json.dumps({"times": times, "cpu_blas": mlxrunner.cpu_blas}))
""")


def test_batch32_short_ours_reference_blas(ours, short_texts, tmp_path):
    """Ours without the shim (MLXRUNNER_CPU_BLAS=reference), timed inside a `python -c` subprocess."""
    out = tmp_path / "vectors.npy"
    env = {**os.environ, "MLXRUNNER_CPU_BLAS": "reference"}
    proc = subprocess.run([sys.executable, "-c", REFERENCE_BLAS_SCRIPT, json.dumps(short_texts),
                           str(REFERENCE_BLAS_ROUNDS), str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cpu_blas"] == "reference"
    times = sorted(report["times"])
    median = float(np.median(times))
    RESULTS.rows[(REFERENCE_BLAS_CASE, "ours")] = Record(median, N_SENTENCES, len(times),
                                                      "subprocess, MLXRUNNER_CPU_BLAS=reference")
    # Same network, different BLAS: the vectors must still agree with the OpenBLAS ones.
    check_agreement("batch32-short reference BLAS", np.load(out), ours.embed(short_texts).vectors)


# --- 3. start-up ------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="startup (seconds)")
def test_runner_time_to_ready_ours(benchmark):
    """`Runner.start("all-minilm")`: spawn `python -m mlxrunner` until /health answers 200."""
    from mlxrunner.launcher import Runner

    started: list[Runner] = []

    def close_previous():
        while started:
            started.pop().close()

    def start():
        started.append(Runner.start("all-minilm", timeout=120))

    try:
        benchmark.pedantic(start, setup=close_previous, rounds=STARTUP_ROUNDS, iterations=1)
        assert started[-1].health()["status"] == "ok"
        # A working server, not just one that says ok: one request through it.
        vec = np.asarray(started[-1].embed(["The museum opens at nine in the morning and closes at six."])[0])
        assert abs(np.linalg.norm(vec) - 1.0) < 1e-4
    finally:
        close_previous()
    record(benchmark, "runner time-to-ready (Runner.start -> /health 200)", "ours", 0,
           "spawn + imports + model load + server up")


@pytest.mark.benchmark(group="startup (seconds)")
def test_model_load_ours(benchmark):
    """In-process load: BertEmbedder(store.resolve("all-minilm")), weights read (mx.eval)."""
    from mlxrunner import store
    from mlxrunner.embed.bert import BertEmbedder

    benchmark.pedantic(lambda: BertEmbedder(store.resolve("all-minilm")), rounds=STARTUP_ROUNDS, iterations=1)
    record(benchmark, "model load in-process", "ours", 0, "BertEmbedder(store.resolve('all-minilm'))")


@pytest.mark.benchmark(group="startup (seconds)")
def test_model_load_peer(benchmark, peer_modules, model_dir):
    """The peer has no server; for context, sentence-transformers' in-process model load."""
    _, sentence_transformers = peer_modules
    benchmark.pedantic(lambda: sentence_transformers.SentenceTransformer(str(model_dir), device="cpu"),
                       rounds=STARTUP_ROUNDS, iterations=1)
    record(benchmark, "model load in-process", "peer", 0,
           "SentenceTransformer(model_dir, device='cpu'), torch already imported")
