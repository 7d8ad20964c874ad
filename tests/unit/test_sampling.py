"""C++ sampling (csrc/text/sampling.cpp) against a NumPy reference of the same math, and statistically."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import _core

V = 64


def options(**kw) -> _core.SamplerOptions:
    o = _core.SamplerOptions()
    o.temperature, o.top_k, o.top_p, o.min_p = 1.0, 0, 1.0, 0.0
    o.repeat_penalty, o.repeat_last_n, o.presence_penalty, o.frequency_penalty = 1.0, 64, 0.0, 0.0
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def reference(z, history, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
              repeat_last_n=64, presence_penalty=0.0, frequency_penalty=0.0):
    """Ollama's order (docs/models/llm.md), written plainly in NumPy (float64)."""
    z = np.array(z, dtype=np.float64)
    window = list(history)[-repeat_last_n:] if repeat_last_n > 0 else list(history)
    if repeat_last_n != 0:
        for t in set(window):
            if repeat_penalty != 1.0:
                z[t] = z[t] * repeat_penalty if z[t] < 0 else z[t] / repeat_penalty
            z[t] -= presence_penalty
        for t in window:
            z[t] -= frequency_penalty
    if temperature <= 0:
        p = np.zeros_like(z)
        p[np.argmax(z)] = 1
        return p
    p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    if 0 < top_k < len(z):
        kth = np.sort(z)[len(z) - top_k]
        p = np.where(z >= kth, p, 0)
        p /= p.sum()
    if 0 < top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, dtype=bool)
        keep[order] = before < top_p
        p = np.where(keep, p, 0)
    if min_p > 0:
        p = np.where(p < min_p * p.max(), 0, p)
    return p / max(p.sum(), 1e-20)


CASES = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(top_p=0.5),
    dict(temperature=0.5, top_k=10, top_p=0.8),
    dict(min_p=0.2),
    dict(repeat_penalty=1.5),
    dict(repeat_penalty=1.3, repeat_last_n=3),
    dict(presence_penalty=0.8, frequency_penalty=0.3),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.1, presence_penalty=0.2,
         frequency_penalty=0.1),
    dict(temperature=0.0, repeat_penalty=2.0),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_distribution_matches_the_numpy_reference(case):
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=2.0, size=V).astype(np.float32)
    history = [3, 5, 5, 9, 3, 12, 40, 5]
    sampler = _core.Sampler(options(**case), V)
    sampler.remember(mx.array(history, mx.int32))
    ours = np.array(sampler.probabilities(mx.array(logits)))
    np.testing.assert_allclose(ours, reference(logits, history, **case), atol=2e-6)


def test_greedy_is_argmax_after_penalties():
    logits = np.zeros(V, dtype=np.float32)
    logits[[4, 7]] = [3.0, 2.5]
    sampler = _core.Sampler(options(temperature=0.0, repeat_penalty=2.0), V)
    assert sampler.sample(mx.array(logits)) == 4
    # 4 is now in the history: 3.0 / 2 = 1.5 < 2.5
    assert sampler.sample(mx.array(logits)) == 7


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = mx.array(np.random.default_rng(1).normal(size=V).astype(np.float32))

    def draws(seed):
        s = _core.Sampler(options(seed=seed), V)
        return [s.sample(logits) for _ in range(50)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)


def test_splitmix64_known_values():
    # The reference values of SplitMix64 with seed 0: the first outputs of the standard generator.
    assert _core.splitmix64(0, 0) == 0xE220A8397B1DCDAF
    assert _core.splitmix64(0, 1) == 0x6E789E6AA1B965F4


@pytest.mark.parametrize("case", [dict(temperature=1.0), dict(temperature=0.8, top_k=6, top_p=0.9)])
def test_draws_follow_the_distribution(case):
    """Chi-square goodness of fit over 4000 seeded draws (p > 0.001 for a correct sampler)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=12).astype(np.float32)
    expected = reference(logits, [], **case)
    sampler = _core.Sampler(options(seed=123, **case), 12)
    n = 4000
    counts = np.bincount([sampler.sample(mx.array(logits)) for _ in range(n)], minlength=12)
    support = expected > 0
    assert counts[~support].sum() == 0  # never a token the filters removed
    chi2 = (((counts[support] - n * expected[support]) ** 2) / (n * expected[support])).sum()
    dof = support.sum() - 1
    # 0.999 quantile of chi-square: dof + 3.1 sqrt(2 dof) + ... ; a generous closed-form bound.
    assert chi2 < dof + 4.5 * np.sqrt(2 * dof) + 10, (chi2, dof)


def test_wrong_logits_shape_is_an_error():
    with pytest.raises(ValueError, match=r"sampler expects logits \[64\]"):
        _core.Sampler(options(), V).sample(mx.zeros((2, V)))
