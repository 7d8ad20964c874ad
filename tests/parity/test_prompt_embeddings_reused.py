"""A prompt encoded recently is not encoded again (imagegen/prompt_embeddings.py): trying seeds or sizes for one
prompt draws each image from the kept embedding, the same bits as encoding it anew, and under --low-memory the text
encoder's weights are not read again for it (the encode phase's peak memory shows it)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner.imagegen import load_pipeline

FIXTURES = Path(__file__).parents[1] / "fixtures"
REQUEST = dict(width=64, height=64, steps=2)


@pytest.mark.parametrize(("model", "extra"), [("zimage-tiny", {}), ("flux2-klein-tiny", {}),
                                              ("flux2-klein-base-tiny", {"guidance": 4.0, "negative_prompt": "blur"})])
def test_a_repeated_prompt_reuses_its_embedding_and_draws_the_same_image(model, extra):
    pipe = load_pipeline(str(FIXTURES / model))
    first = pipe.run("a red fox", seed=3, **REQUEST, **extra)
    misses = pipe.prompt_embeddings.misses
    other = pipe.run("a blue bird", seed=3, **REQUEST, **extra)
    again = pipe.run("a red fox", seed=3, **REQUEST, **extra)
    new_seed = pipe.run("a red fox", seed=4, **REQUEST, **extra)
    assert pipe.prompt_embeddings.misses == misses + 1  # only "a blue bird" was encoded after the first run
    assert pipe.prompt_embeddings.hits >= 2 + (1 if extra else 0)  # with CFG the negative prompt is kept as well
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))
    assert not np.array_equal(np.asarray(other.image), np.asarray(first.image))
    assert not np.array_equal(np.asarray(new_seed.image), np.asarray(first.image))
    fresh = load_pipeline(str(FIXTURES / model)).run("a red fox", seed=4, **REQUEST, **extra)
    assert np.array_equal(np.asarray(new_seed.image), np.asarray(fresh.image))  # reused = encoded anew, bit for bit


def test_under_low_memory_a_repeated_prompt_leaves_the_text_encoder_unread():
    pipe = load_pipeline(str(FIXTURES / "zimage-tiny"), low_memory=True)
    first = pipe.run("a red fox", seed=3, **REQUEST)  # the encoder read at load encodes it, then is freed
    again = pipe.run("a red fox", seed=5, **REQUEST)  # the kept embedding: the encoder is not read
    new_prompt = pipe.run("a blue bird", seed=3, **REQUEST)  # the encoder read again
    before = mx.get_active_memory()
    pipe.text_encoder.load()  # what the encoder's weights hold, measured the same way
    encoder_bytes = mx.get_active_memory() - before
    pipe.text_encoder.release()
    assert encoder_bytes > 0
    for encoded in (first, new_prompt):
        assert encoded.peak_memory["encode"] - again.peak_memory["encode"] >= 0.9 * encoder_bytes
