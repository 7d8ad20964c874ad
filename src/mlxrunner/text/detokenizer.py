"""Token ids -> text as they are generated, one id at a time (docs/models/llm.md).

Decoding each token alone is wrong: a byte-level token may hold half of a CJK character or an
emoji, and `decode([id])` turns that half into U+FFFD. Instead the raw bytes of each token
(`TextTokenizer.token_bytes`) go through an incremental UTF-8 decoder, which

* holds back an incomplete trailing character until the token that completes it arrives, and
* replaces a byte by U+FFFD only once no later byte can make it valid (and, at `flush`, a
  character left incomplete at the end of the stream).

Python's incremental decoder replaces invalid bytes exactly as `tokenizers`' whole-text decode
(Rust's from_utf8_lossy) does, so for byte-level BPE the concatenated output equals
`tokenizer.decode(ids)`.

SentencePiece decoders also strip the text's first space(s) (the `▁` that encoding put in front of
the first word); this is done on the output text, once, as the decoder does on the whole text.

Known differences from `decode` (both in text that was already garbled): SentencePiece's
ByteFallback decoder replaces *every* byte of an invalid run of `<0xNN>` tokens by U+FFFD, where we
replace only the invalid bytes; and added tokens are always their literal content, where
`tokenizers` passes them through the decoder too.

Decoders of kind OTHER have no byte mapping we can trust, so for them the whole id list is
re-decoded after every token and the new tail emitted (quadratic, but exact).
"""

from __future__ import annotations

import codecs

from mlxrunner.text.tokenizer import DecoderKind, TextTokenizer

REPLACEMENT_CHARACTER = "\ufffd"


class StreamingDetokenizer:
    """Turns one stream of generated token ids into text. Create one per response."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._by_bytes = tokenizer.decoder_kind is not DecoderKind.OTHER
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._spaces_to_strip = tokenizer.leading_spaces_stripped
        # Only for re-decoding (DecoderKind.OTHER): every id so far, and how much text went out.
        self._ids: list[int] = []
        self._emitted_chars = 0

    def add(self, token_id: int) -> str:
        """Take the next token; return the text it completes (often "", never a partial character)."""
        if self._by_bytes:
            return self._strip_leading_spaces(self._utf8.decode(self._tokenizer.token_bytes(token_id)))
        self._ids.append(token_id)
        return self._redecoded_tail(final=False)

    def flush(self) -> str:
        """End of stream: return whatever is still held (an unfinished character becomes U+FFFD)."""
        if self._by_bytes:
            return self._strip_leading_spaces(self._utf8.decode(b"", final=True))
        return self._redecoded_tail(final=True)

    def _strip_leading_spaces(self, text: str) -> str:
        # The decoder's Strip looks at the start of the whole text, which may arrive over several
        # calls (a first token that is only part of a character yields "").
        while self._spaces_to_strip and text:
            if text[0] != " ":
                self._spaces_to_strip = 0
                break
            text = text[1:]
            self._spaces_to_strip -= 1
        return text

    def _redecoded_tail(self, final: bool) -> str:
        text = self._tokenizer.decode(self._ids)
        if not final:
            # A trailing U+FFFD may be half a character whose other half is still to come.
            text = text.rstrip(REPLACEMENT_CHARACTER)
        tail = text[self._emitted_chars:]
        self._emitted_chars = max(self._emitted_chars, len(text))
        return tail
