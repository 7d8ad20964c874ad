"""What holding an answer to JSON costs (docs/models/llm.md, "Answers held to JSON"), on the CPU.

    python -m pytest benchmarks/cpu/test_json_output.py -q -s      # ~1 minute on 2 cores

- test_decode: ms per generated token of a greedy answer, free and held to JSON, on the Qwen3-0.6B-shaped model
  (benchmarks/cpu/llm_models.py), rounds alternating. Held to JSON a step does not decode ahead, and a refused
  draw builds the mask (this model's tokenizer is the tiny fixture's, 503 tokens: its masks are cheap).
- test_mask: the mask alone over a 151,936-token vocabulary (Qwen3's size) of synthetic pieces, in three places
  of a document: what a refused draw costs with a real vocabulary.

No peer: mlx-lm has no JSON mode. Ours is compared with itself, free, in the same run.
"""

from __future__ import annotations

import random
import statistics
import time

import pytest

from benchmarks.cpu.llm_models import qwen3_06b
from mlxrunner import _core
from mlxrunner.request import Options

PROMPT = list(range(10, 42))
TOKENS = 32
ROUNDS = 3
_model = {}


def model():
    if "m" not in _model:
        from mlxrunner import llm

        _model["m"] = llm.load(str(qwen3_06b("float32")))  # the CPU's fast path (MLX has no bf16 BLAS)
    return _model["m"]


def ms_per_token(json_output: bool) -> float:
    final = None
    for item in model().stream(PROMPT, Options(temperature=0, repeat_penalty=1.0, num_predict=TOKENS),
                               json_output=json_output):
        if not isinstance(item, str) and hasattr(item, "eval_count"):
            final = item
    return final.eval_duration / 1e6 / max(1, final.eval_count - 1)


def test_decode():
    ms_per_token(False), ms_per_token(True)  # warm-up
    free, held = [], []
    for _ in range(ROUNDS):
        free.append(ms_per_token(False))
        held.append(ms_per_token(True))
    free_ms, held_ms = statistics.median(free), statistics.median(held)
    print(f"\nQwen3-0.6B-shaped float32, greedy, {TOKENS} tokens, {ROUNDS} rounds: free {free_ms:.1f} ms/token, "
          f"held to JSON {held_ms:.1f} ms/token, ratio {held_ms / free_ms:.2f}")
    assert all(t > 0 for t in free + held)


def synthetic_vocabulary(size: int = 151936) -> tuple[_core.TokenVocabulary, list[bytes]]:
    rng = random.Random(0)
    alphabet = b'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789{}[]:,"\\.-\n\t'
    pieces = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(size)]
    return _core.TokenVocabulary(b"".join(pieces), [len(p) for p in pieces]), pieces


@pytest.mark.parametrize("prefix", [b"{", b'{"name": "rex', b'{"a": [1, 2'], ids=["after {", "in a string",
                                                                              "in a number"])
def test_mask(prefix):
    vocabulary, pieces = synthetic_vocabulary()
    constraint = _core.JsonConstraint(vocabulary, len(pieces))
    for byte in prefix:  # walk there a byte at a time, through single-byte pieces
        constraint.accept(pieces.index(bytes([byte])))
    constraint.mask()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        mask = constraint.mask()
        times.append(time.perf_counter() - start)
    allowed = int((mask == 0).sum().item())
    print(f"\nmask over {len(pieces)} tokens {prefix!r}: {statistics.median(times) * 1000:.2f} ms, {allowed} allowed")
    assert 0 < allowed < len(pieces)
