"""all-MiniLM-L6-v2 through our C++ BERT against sentence-transformers' recorded outputs.

Goldens: tests/goldens/minilm.json, recorded by scripts/make_goldens.py with sentence-transformers
on PyTorch (CPU, float32). This test needs no torch.
"""

import numpy as np
import pytest
from conftest import cosine, float32_tol

MIN_COSINE = 0.99999


def test_goldens_cover_what_the_issue_asks(minilm_goldens):
    ids = {s["id"] for s in minilm_goldens["sentences"]}
    assert len(ids) >= 20
    assert {"empty", "chinese", "japanese", "emoji", "long_400_words"} <= ids
    assert any(s["n_tokens_untruncated"] > minilm_goldens["metadata"]["max_seq_length"]
               for s in minilm_goldens["sentences"])


def test_token_ids_match_sentence_transformers(minilm_embedder, minilm_goldens):
    texts = [s["text"] for s in minilm_goldens["sentences"]]
    ids, truncated = minilm_embedder.encode_ids(texts)
    for sentence, ours in zip(minilm_goldens["sentences"], ids):
        assert ours == sentence["input_ids"], sentence["id"]
    assert sorted(truncated) == [i for i, s in enumerate(minilm_goldens["sentences"]) if s["truncated"]]


@pytest.mark.parametrize("normalize", [True, False])
def test_each_sentence_alone_matches(minilm_embedder, minilm_goldens, normalize):
    key = "embedding" if normalize else "embedding_unnormalized"
    worst = (1.0, None)
    for sentence in minilm_goldens["sentences"]:
        vec = minilm_embedder.embed([sentence["text"]], normalize=normalize).vectors[0]
        c = cosine(vec, sentence[key])
        worst = min(worst, (c, sentence["id"]))
        # Not just the direction: the length too (normalised -> 1, raw -> the reference norm).
        np.testing.assert_allclose(np.linalg.norm(vec), np.linalg.norm(sentence[key]),
                                   rtol=float32_tol(1e-4, 1e-3))
    assert worst[0] >= MIN_COSINE, f"cosine {worst[0]:.7f} for {worst[1]}"


def test_one_batch_of_mixed_lengths_matches_one_at_a_time(minilm_embedder, minilm_goldens):
    texts = [s["text"] for s in minilm_goldens["sentences"]]
    batched = minilm_embedder.embed(texts).vectors
    for i, sentence in enumerate(minilm_goldens["sentences"]):
        alone = minilm_embedder.embed([sentence["text"]]).vectors[0]
        assert cosine(batched[i], alone) >= 0.999999, sentence["id"]
        assert cosine(batched[i], minilm_goldens["batched_embeddings"][i]) >= MIN_COSINE, sentence["id"]


def test_model_folder_settings_are_read(minilm_embedder):
    assert minilm_embedder.pipeline.pooling == "mean"
    assert minilm_embedder.pipeline.normalize is True
    assert minilm_embedder.pipeline.max_tokens == 256
    assert minilm_embedder.dims == 384


def test_over_length_input_without_truncation_is_refused(minilm_embedder, minilm_goldens):
    from mlxrunner.embed.bert import InputTooLong

    long_text = next(s["text"] for s in minilm_goldens["sentences"] if s["id"] == "long_400_words")
    with pytest.raises(InputTooLong, match=r"input 1 has 469 tokens, more than the model's maximum of 256"):
        minilm_embedder.embed(["short", long_text], truncate=False)


def test_token_count_includes_special_tokens(minilm_embedder):
    result = minilm_embedder.embed(["hello world", ""])
    assert result.token_count == 4 + 2


def test_batches_keep_the_token_budget_and_pad_only_similar_lengths():
    from mlxrunner.embed.bert import MAX_BATCH, TOKENS_PER_BATCH, length_batches

    lengths = [256, 10, 12, 200, 120, 9, 64, 64, 3, 128] * 7
    for padded in (True, False):
        batches = length_batches(lengths, padded=padded)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        for batch in batches:
            longest = max(lengths[i] for i in batch)
            assert len(batch) <= MAX_BATCH
            assert (longest * len(batch) if padded else sum(lengths[i] for i in batch)) <= TOKENS_PER_BATCH
            if padded:  # padding never more than the input itself
                assert all(2 * lengths[i] >= longest for i in batch)
    # Without padding, inputs of any lengths share a batch: fewer, fuller batches.
    assert len(length_batches(lengths, padded=False)) < len(length_batches(lengths, padded=True))


def test_the_cpu_runs_sequences_without_padding(minilm_embedder):
    import mlx.core as mx

    assert minilm_embedder.encoder.packs_sequences == (mx.default_device() == mx.cpu)
