"""Sentence embeddings from a BERT-family encoder (e.g. sentence-transformers/all-MiniLM-L6-v2).

Python glue around `mlxrunner._core.BertEncoder`: reads the folder's configs the way
sentence-transformers does (modules.json -> Transformer, Pooling, Normalize; 1_Pooling/config.json;
sentence_bert_config.json's max_seq_length), tokenizes with `tokenizers`, batches inputs by length,
and lets C++ run the network, the pooling and the normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlxrunner import _core, backend
from mlxrunner.errors import ModelError

ST_PREFIX = "sentence_transformers.models."
SUPPORTED_MODULES = {"Transformer", "Pooling", "Normalize"}
POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
# Token budget per batch (its tokens; padded: batch size x the longest length): bounds memory, and how long a cancel
# waits.
TOKENS_PER_BATCH = 2048
MAX_BATCH = 64


class InputTooLong(ValueError):
    """An input has more tokens than the model takes and truncation was turned off."""


@dataclass(frozen=True)
class Pipeline:
    """How token states become a sentence vector, as the model folder says."""

    pooling: str  # mean | cls | max | mean_sqrt_len
    normalize: bool
    max_tokens: int


@dataclass
class EmbeddingResult:
    vectors: np.ndarray  # [n, dims] float32
    token_count: int  # tokens fed to the network, special tokens included
    truncated: list[int]  # indices of inputs that were cut to max_tokens


def read_bert_config(config: dict) -> _core.BertConfig:
    """transformers' BertConfig fields -> the C++ config."""
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"config.json: position_embedding_type '{config['position_embedding_type']}' is not "
                         "supported (only 'absolute')")
    try:
        return _core.BertConfig.from_dict(config)
    except ValueError as exc:
        raise ModelError(f"config.json: {exc}") from None


def read_pipeline(source, bert: _core.BertConfig) -> Pipeline:
    """sentence-transformers' modules.json (or its defaults for a plain BERT folder)."""
    if not source.has_file("modules.json"):
        # sentence-transformers wraps a plain transformers folder in Transformer + mean Pooling.
        return Pipeline("mean", False, _max_tokens(source, bert))
    modules = source.read_json("modules.json", expect=list)
    kinds = [str(m.get("type", "")).removeprefix(ST_PREFIX) for m in modules]
    unsupported = [k for k in kinds if k not in SUPPORTED_MODULES]
    if unsupported:
        raise ModelError(f"modules.json: unsupported sentence-transformers modules {unsupported} "
                         f"(supported: {sorted(SUPPORTED_MODULES)})")
    pooling = "cls"  # sentence-transformers' output without a Pooling module is the CLS state
    for module, kind in zip(modules, kinds):
        if kind == "Pooling":
            pooling = _read_pooling(source, module.get("path", "1_Pooling"))
    return Pipeline(pooling, "Normalize" in kinds, _max_tokens(source, bert))


def _read_pooling(source, path: str) -> str:
    config = source.read_json(f"{path}/config.json")
    modes = [mode for key, mode in POOLING_KEYS.items() if config.get(key)]
    if len(modes) != 1:
        raise ModelError(f"{path}/config.json: exactly one pooling mode must be on, found {modes or 'none'} "
                         f"(supported: {', '.join(POOLING_KEYS.values())})")
    return modes[0]


def _max_tokens(source, bert: _core.BertConfig) -> int:
    limit = bert.max_position_embeddings
    if source.has_file("sentence_bert_config.json"):
        seq = source.read_json("sentence_bert_config.json").get("max_seq_length")
        if isinstance(seq, int) and seq > 0:
            return min(seq, limit)
    if source.has_file("tokenizer_config.json"):
        seq = source.read_json("tokenizer_config.json").get("model_max_length")
        if isinstance(seq, int) and seq > 0:
            return min(seq, limit)
    return limit


def load_tokenizer(source) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(source.file_path("tokenizer.json")))
    # tokenizer.json may carry its own fixed padding/truncation (MiniLM's pads to 128):
    # we pad per batch and truncate to the model's max_seq_length ourselves.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class BertEmbedder:
    """A loaded sentence-embedding model. Call from the MLX worker thread."""

    def __init__(self, source, progress: Callable[[float], None] | None = None):
        config = source.read_json("config.json")
        bert = read_bert_config(config)
        self.pipeline = read_pipeline(source, bert)
        self.tokenizer = load_tokenizer(source)
        weights = backend.compute_weights(source.tensors(""))
        if progress:
            progress(0.5)
        try:
            self.encoder = _core.BertEncoder(bert, weights)
        except ValueError as exc:
            raise ModelError(f"{source.location}: {exc}") from None
        # Read the weights now (they are lazy mmap-backed loads) so the first request is not slow.
        mx.eval(list(weights.values()))
        self.dims = bert.hidden_size
        self.context_length = self.pipeline.max_tokens

    # --- text <-> ids ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode does not), so the event loop keeps answering.
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def detokenize(self, ids: list[int]) -> str:
        vocab = self.tokenizer.get_vocab_size()
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_ids(self, texts: list[str], truncate: bool = True) -> tuple[list[list[int]], list[int]]:
        """Token ids as the network sees them ([CLS] ... [SEP]), cut to max_tokens when allowed."""
        limit = self.pipeline.max_tokens
        ids, truncated = [], []
        for index, encoding in enumerate(self.tokenizer.encode_batch(texts)):
            seq = encoding.ids
            if len(seq) > limit:
                if not truncate:
                    raise InputTooLong(
                        f"input {index} has {len(seq)} tokens, more than the model's maximum of {limit} "
                        "(send truncate: true to cut it)")
                # Keep the leading tokens and the closing special token, as tokenizers' truncation does.
                seq = seq[: limit - 1] + seq[-1:]
                truncated.append(index)
            ids.append(seq)
        return ids, truncated

    # --- embeddings -----------------------------------------------------------------------------

    def embed(self, texts: list[str], normalize: bool | None = None, truncate: bool = True,
              check_cancelled: Callable[[], None] | None = None) -> EmbeddingResult:
        normalize = self.pipeline.normalize if normalize is None else normalize
        ids, truncated = self.encode_ids(texts, truncate)
        vectors = np.zeros((len(texts), self.dims), dtype=np.float32)
        for batch in length_batches([len(s) for s in ids], padded=not self.encoder.packs_sequences):
            if check_cancelled:
                check_cancelled()
            out = self.encoder.embed_sequences([ids[i] for i in batch], self.pipeline.pooling, normalize)
            vectors[batch] = np.array(out, copy=False)
        return EmbeddingResult(vectors, sum(len(s) for s in ids), truncated)


def length_batches(lengths: list[int], padded: bool = True) -> list[list[int]]:
    """Group input indices into batches within a token budget, longest first. Padded batches (every input as long as
    the batch's longest) take inputs of similar lengths; packed ones (the CPU's, without padding) count only their
    tokens, so inputs of any lengths share a batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    tokens = 0  # the last batch's (padded: its longest length times its inputs)
    for index in order:
        if batches:
            current = batches[-1]
            longest = lengths[current[0]]  # inputs come longest first
            added = longest if padded else lengths[index]
            fits = len(current) < MAX_BATCH and tokens + added <= TOKENS_PER_BATCH
            # Past half the longest length, padding would cost more than a separate batch.
            if fits and (not padded or 2 * lengths[index] >= longest):
                current.append(index)
                tokens += added
                continue
        batches.append([index])
        tokens = lengths[index]
    return batches
