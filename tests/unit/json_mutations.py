"""Small edits of a JSON text, for the recogniser's tests (test_json_grammar.py, test_json_schema.py): Hypothesis
draws up to three inserts, replacements or deletions of bytes that matter to JSON."""

from __future__ import annotations

from hypothesis import strategies as st

EDIT_BYTES = st.sampled_from(list(b'{}[]:,"\\ -+.0123456789eEtrufalsnxyzabcdkmp\x01\x7f')
                             + [0xC3, 0xA9, 0xE0, 0x80, 0xED, 0xA0, 0xF4, 0x90, 0xFF])
EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["insert", "replace", "delete"]), EDIT_BYTES),
                 min_size=1, max_size=3)


def edited(text: bytes, edits: list[tuple[int, str, int]]) -> bytes:
    """`text` with the edits applied in turn (positions wrap around the text's length)."""
    out = bytearray(text)
    for position, kind, byte in edits:
        if not out and kind != "insert":
            continue
        position %= len(out) + (kind == "insert")
        if kind == "insert":
            out.insert(position, byte)
        elif kind == "replace":
            out[position] = byte
        else:
            del out[position]
    return bytes(out)
