"""PromptEmbeddings (imagegen/prompt_embeddings.py): an embedding made once per token-id sequence, kept evaluated,
the least recently used dropped past the limit; hits and misses counted."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner.imagegen.prompt_embeddings import PROMPT_EMBEDDINGS_KEPT, PromptEmbeddings


class Encoder:
    """A real (tiny) computation standing in for a text encoder, counting its calls."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, ids: list[int]) -> mx.array:
        self.calls.append(ids)
        return mx.array(ids, mx.float32)[:, None] * mx.arange(3, dtype=mx.float32)


def test_the_same_ids_take_the_kept_embedding_without_encoding_again():
    kept, encode = PromptEmbeddings(), Encoder()
    first = kept.get_or_make([5, 6, 7], encode)
    again = kept.get_or_make((5, 6, 7), encode)  # any sequence of the same ids
    other = kept.get_or_make([5, 6], encode)
    assert encode.calls == [[5, 6, 7], [5, 6]]
    assert again is first
    assert np.array_equal(np.array(first), np.array([[0, 5, 10], [0, 6, 12], [0, 7, 14]]))
    assert other.shape == (2, 3)
    assert (kept.hits, kept.misses, len(kept)) == (1, 2, 2)


def test_past_the_limit_the_least_recently_used_is_dropped():
    kept, encode = PromptEmbeddings(kept=2), Encoder()
    kept.get_or_make([1], encode)
    kept.get_or_make([2], encode)
    kept.get_or_make([1], encode)  # [1] is now the most recently used
    kept.get_or_make([3], encode)  # drops [2]
    kept.get_or_make([1], encode)
    kept.get_or_make([2], encode)  # made again
    assert encode.calls == [[1], [2], [3], [2]]
    assert len(kept) == 2
    assert PROMPT_EMBEDDINGS_KEPT >= 2  # a prompt and its negative fit together


def test_a_failed_encoding_keeps_nothing_and_clear_empties():
    kept = PromptEmbeddings()

    def failing(ids):
        raise RuntimeError("the encoder failed")

    with pytest.raises(RuntimeError, match="the encoder failed"):
        kept.get_or_make([1, 2], failing)
    assert len(kept) == 0
    kept.get_or_make([1, 2], Encoder())
    kept.clear()
    assert len(kept) == 0
