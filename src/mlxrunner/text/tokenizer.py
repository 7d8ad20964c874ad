"""A model's text tokenizer: `tokenizer.json` through Hugging Face `tokenizers`, plus the model's
special-token rules (docs/models/llm.md).

`tokenizers` does the encoding and decoding; this module adds what it leaves to its callers:

* BOS: what the tokenizer.json post-processor adds, plus an explicit BOS when tokenizer_config.json
  says `add_bos_token: true` and the post-processor did not add one. Never two BOS in a row because
  the prompt already began with the BOS text.
* The EOS set, as mlx-lm builds it: generation_config.json's `eos_token_id` (int or list, which
  overrides config.json's) plus tokenizer_config.json's `eos_token`.
* `token_bytes(id)`: the raw bytes one token stands for. `decode([id])` cannot give them: it turns a
  token holding part of a UTF-8 character into U+FFFD, so streaming (detokenizer.py) is
  built on these bytes instead.

How a token maps to bytes depends on the decoder named in tokenizer.json (see `DecoderKind`).
"""

from __future__ import annotations

import enum
import functools
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from mlxrunner.errors import ModelError

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's stand-in for a space
_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class DecoderKind(enum.Enum):
    """How token ids become text, read from tokenizer.json's `decoder`.

    BYTE_LEVEL: GPT-2 style; every token character stands for one byte (Llama 3, Qwen, Mistral tekken).
    SENTENCEPIECE: `▁` means a space and `<0xNN>` pieces are raw bytes (Llama 2, Mistral v1, Gemma).
    OTHER: any decoder not recognised above (WordPiece, Metaspace, none...): only `decode` is exact,
        so the streaming detokenizer re-decodes instead of using `token_bytes`.
    """

    BYTE_LEVEL = "byte_level"
    SENTENCEPIECE = "sentencepiece"
    OTHER = "other"


# --- GPT-2 byte <-> unicode table -------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes stand for themselves, the other 68 are shifted to U+0100 and up,
    so that every byte is a visible character in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def byte_level_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE token string stands for.

    A piece with a character outside the table is taken as literal text, as the `tokenizers`
    ByteLevel decoder does.
    """
    try:
        return bytes(_UNICODE_TO_BYTE[char] for char in piece)
    except KeyError:
        return piece.encode("utf-8")


def sentencepiece_bytes(piece: str, byte_fallback: bool) -> bytes:
    """The bytes a SentencePiece-style token stands for: `<0xNN>` is one raw byte (when the decoder
    has ByteFallback), and `▁` is a space."""
    if byte_fallback:
        match = _BYTE_FALLBACK_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
    return piece.replace(SPIECE_UNDERLINE, " ").encode("utf-8")


# --- reading tokenizer.json's decoder ---------------------------------------------------------------

def describe_decoder(decoder: dict | None) -> tuple[DecoderKind, bool, int]:
    """(kind, byte_fallback, leading_spaces_stripped) for a tokenizer.json `decoder` section.

    leading_spaces_stripped: how many leading spaces a SentencePiece decoder's final
    `Strip(" ", start=n)` removes from the whole decoded text (Llama 2 has 1, Gemma has none).

    Only the decoder shapes we can reproduce byte for byte are recognised; anything else is OTHER.
    """
    if decoder is None:
        return DecoderKind.OTHER, False, 0
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    types = [step.get("type") for step in steps]
    if types and all(t == "ByteLevel" for t in types):
        return DecoderKind.BYTE_LEVEL, False, 0
    return _describe_sentencepiece(steps)


def _describe_sentencepiece(steps: list[dict]) -> tuple[DecoderKind, bool, int]:
    # The shape transformers' converters write: Replace("▁", " "), [ByteFallback], [Fuse], [Strip].
    # Strip must come after Fuse: before it, it would strip every token, not the text.
    if not steps or not _is_spiece_replace(steps[0]):
        return DecoderKind.OTHER, False, 0
    rest = [step.get("type") for step in steps[1:]]
    byte_fallback = bool(rest) and rest[0] == "ByteFallback"
    if byte_fallback:
        rest = rest[1:]
    fused = bool(rest) and rest[0] == "Fuse"
    if fused:
        rest = rest[1:]
    if not rest:
        return DecoderKind.SENTENCEPIECE, byte_fallback, 0
    strip = steps[-1]
    if fused and rest == ["Strip"] and strip.get("content") == " " and not strip.get("stop"):
        return DecoderKind.SENTENCEPIECE, byte_fallback, int(strip.get("start") or 0)
    return DecoderKind.OTHER, False, 0


def _is_spiece_replace(step: dict) -> bool:
    pattern = step.get("pattern") or {}
    return (step.get("type") == "Replace" and pattern.get("String") == SPIECE_UNDERLINE
            and step.get("content") == " ")


# --- special tokens ---------------------------------------------------------------------------------

def _token_content(token: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or an AddedToken dict {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _token_ids(value: Any) -> list[int]:
    """An `*_token_id` config value (int, list of ints, or null) as a list."""
    values = value if isinstance(value, list) else [value]
    # bool is an int in Python; `true` is never a token id.
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _config_ids(config: dict, key: str) -> list[int] | None:
    """config.json's ids for `key`; multimodal configs keep them in text_config. None if absent."""
    for section in (config, config.get("text_config")):
        if isinstance(section, dict) and section.get(key) is not None:
            return _token_ids(section[key])
    return None


# --- the tokenizer ----------------------------------------------------------------------------------

class TextTokenizer:
    """Encode prompts and decode generated ids for one model.

    Reads `tokenizer.json` (required) and, for special tokens, the model's tokenizer_config.json,
    generation_config.json and config.json (each optional, passed already parsed).
    """

    def __init__(self, tokenizer_json_path: str | Path, tokenizer_config: dict | None = None,
                 generation_config: dict | None = None, config: dict | None = None):
        self._tokenizer = _load_tokenizer(Path(tokenizer_json_path))
        self._tokenizer_config = tokenizer_config or {}
        self.decoder_kind, self._byte_fallback, self.leading_spaces_stripped = describe_decoder(
            _decoder_section(self._tokenizer))
        self._added_tokens = self._tokenizer.get_added_tokens_decoder()
        self._bytes_cache: dict[int, bytes] = {}
        self.vocab_size = self._count_ids()
        self.bos_id = self._resolve_bos(generation_config or {}, config or {})
        self._eos_in_order = self._resolve_eos(generation_config or {}, config or {})
        self.eos_ids = frozenset(self._eos_in_order)
        self.pad_id = self._lookup_token(self._tokenizer_config.get("pad_token"))
        # Only an explicit `true` asks for a BOS beyond the post-processor's (Ollama reads the same key).
        self.add_bos_token = self._tokenizer_config.get("add_bos_token") is True

    @classmethod
    def from_source(cls, source) -> TextTokenizer:
        """Load from a model source (mlxrunner.store.ModelSource): its tokenizer.json and configs."""
        if not source.has_file("tokenizer.json"):
            raise ModelError(f"{source.location}: no tokenizer.json; only models with a Hugging Face "
                             "tokenizer.json are supported")

        def optional_json(name: str) -> dict | None:
            if not source.has_file(name):
                return None
            data = source.read_json(name)
            if not isinstance(data, dict):
                raise ModelError(f"{source.location}: {name} is not a JSON object")
            return data

        return cls(source.file_path("tokenizer.json"), optional_json("tokenizer_config.json"),
                   optional_json("generation_config.json"), optional_json("config.json"))

    # --- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (e.g. `<|im_start|>`) become their
        ids. With add_bos, the post-processor's tokens and, if configured, a BOS are added."""
        # encode_batch lets go of the GIL while it works (encode does not): a long text tokenized on
        # a thread then leaves the event loop free to answer /health.
        ids = self._tokenizer.encode_batch([text], add_special_tokens=add_bos)[0].ids
        if not add_bos or self.bos_id is None:
            return ids
        if self.add_bos_token and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return self._without_doubled_bos(ids, text)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text that one token stands for: the longest piece in
        the vocabulary (a byte-level piece's characters are 1-2 UTF-8 bytes for 1 text byte; a
        SentencePiece `▁` is 3 for a 1-byte space), so no text of N bytes has fewer than N / this tokens."""
        pieces = self._tokenizer.get_vocab(with_added_tokens=True)
        return max((len(piece.encode("utf-8")) for piece in pieces), default=1)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens included, as the tokenizer's decoder writes it."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for (b"" for an id the tokenizer does not know).

        Added and special tokens are their content in UTF-8. For a decoder of kind OTHER this is
        `decode([token_id])` in UTF-8, which may not be exact.
        """
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            cached = self._bytes_cache[token_id] = self._compute_token_bytes(token_id)
        return cached

    def token_table(self) -> tuple[bytes, list[int]]:
        """Every token's bytes one after another and each one's length, for _core.TokenVocabulary (output held
        to JSON); -1 for a special token (end of turn, tool-call markers...), which JSON text never contains."""
        pieces, lengths = [], []
        for token_id in range(self.vocab_size):
            piece = b"" if self.is_special(token_id) else self.token_bytes(token_id)
            pieces.append(piece)
            lengths.append(len(piece) if piece else -1)
        return b"".join(pieces), lengths

    def is_special(self, token_id: int) -> bool:
        token = self._added_tokens.get(token_id)
        return token is not None and token.special

    def eos_or_pad_id(self) -> int:
        """A token to stand for empty input: the first EOS, else the pad token, else BOS, else 0."""
        for candidate in (*self._eos_in_order, self.pad_id, self.bos_id):
            if candidate is not None:
                return candidate
        return 0

    # --- internals --------------------------------------------------------------------------------

    def _compute_token_bytes(self, token_id: int) -> bytes:
        if token_id < 0:
            return b""
        piece = self._tokenizer.model.id_to_token(token_id)
        added = self._added_tokens.get(token_id)
        # An added token that merely re-declares a vocabulary entry (e.g. a byte-level "é" piece) is
        # decoded as that entry, like `tokenizers` does; any other added token is literal text.
        if added is not None and added.content != piece:
            return added.content.encode("utf-8")
        if piece is None:
            return b""
        if self.decoder_kind is DecoderKind.BYTE_LEVEL:
            return byte_level_bytes(piece)
        if self.decoder_kind is DecoderKind.SENTENCEPIECE:
            return sentencepiece_bytes(piece, self._byte_fallback)
        return self.decode([token_id]).encode("utf-8")

    def _without_doubled_bos(self, ids: list[int], text: str) -> list[int]:
        # A prompt rendered from a chat template often starts with the BOS text itself; the
        # post-processor (or add_bos_token) then adds a second one, which degrades generation.
        bos_text = self._tokenizer.id_to_token(self.bos_id)
        if ids[:2] == [self.bos_id, self.bos_id] and bos_text and text.startswith(bos_text):
            return ids[1:]
        return ids

    def _lookup_token(self, token: Any) -> int | None:
        content = _token_content(token)
        return None if content is None else self._tokenizer.token_to_id(content)

    def _resolve_bos(self, generation_config: dict, config: dict) -> int | None:
        # generation_config.json, then config.json, then tokenizer_config.json's bos_token.
        for ids in (_config_ids(generation_config, "bos_token_id"), _config_ids(config, "bos_token_id")):
            if ids:
                return ids[0]
        return self._lookup_token(self._tokenizer_config.get("bos_token"))

    def _resolve_eos(self, generation_config: dict, config: dict) -> tuple[int, ...]:
        # mlx-lm: generation_config's eos_token_id replaces config.json's, then tokenizer_config's
        # eos_token joins them. Ordered (first = primary EOS), without repeats.
        ids = _config_ids(generation_config, "eos_token_id")
        if ids is None:
            ids = _config_ids(config, "eos_token_id") or []
        eos_token = self._lookup_token(self._tokenizer_config.get("eos_token"))
        if eos_token is not None:
            ids = [*ids, eos_token]
        return tuple(dict.fromkeys(ids))

    def _count_ids(self) -> int:
        # 1 + the largest id: added tokens may sit past the model vocabulary, with gaps.
        model_size = self._tokenizer.get_vocab_size(with_added_tokens=False)
        return max([model_size, *(i + 1 for i in self._added_tokens)])


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for bad files
        raise ModelError(f"cannot load tokenizer {path}: {exc}") from None
    # Padding or truncation configured for training would silently change prompts.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _decoder_section(tokenizer: Tokenizer) -> dict | None:
    """tokenizer.json's `decoder`, read back from the loaded tokenizer (tokenizer.json itself can be
    tens of MB; parsing it twice would cost more than this)."""
    decoder = tokenizer.decoder
    return None if decoder is None else json.loads(decoder.__getstate__())
