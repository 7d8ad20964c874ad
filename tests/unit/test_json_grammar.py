"""The JSON recogniser that holds output to JSON (csrc/text/json_grammar.cpp), against Python's own json module.

Whatever it accepts whole must be what json.loads reads as an object, and whatever json.loads reads as an object
(within the recogniser's two caps: 128 open containers, 20 blanks in a row; and starting with its first brace and
ending at its last, since the answer is the object) it must accept whole, byte by byte, never calling a strict
prefix complete. Hypothesis makes the documents and their mutations.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from json_mutations import EDITS, edited

from mlxrunner import _core

SCALARS = (st.none() | st.booleans() | st.integers(-10**20, 10**20)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=4), max_leaves=20)
OBJECTS = st.dictionaries(st.text(max_size=8), VALUES, max_size=5)
LAYOUTS = st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t"}, {"ensure_ascii": False}])


def reads_as_object(text: bytes) -> bool:
    def refuse(constant: str) -> float:
        raise ValueError(constant)

    try:
        value = json.loads(text.decode("utf-8"), parse_constant=refuse)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(value, dict)


def within_caps(text: bytes) -> bool:
    return not re.search(rb"[ \t\n\r]{21}", text) and depth(text) <= 128


def depth(text: bytes) -> int:
    deepest = level = 0
    in_string = escaped = False
    for byte in text:
        char = chr(byte)
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            level += 1
            deepest = max(deepest, level)
        elif char in "]}":
            level -= 1
    return deepest


def fed_whole(text: bytes) -> _core.JsonGrammar | None:
    """The grammar after every byte of `text`, one at a time; None once one is refused."""
    grammar = _core.JsonGrammar()
    for byte in text:
        if not grammar.feed(bytes([byte])):
            return None
    return grammar


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OBJECTS, LAYOUTS)
def test_every_document_json_writes_is_accepted_byte_by_byte_and_complete_only_at_its_end(document, layout):
    text = json.dumps(document, **layout).encode()
    assume(within_caps(text))
    grammar = _core.JsonGrammar()
    for index, byte in enumerate(text):
        assert not grammar.complete, text[:index]
        assert grammar.feed(bytes([byte])), (text[:index + 1], text)
    assert grammar.complete
    assert not grammar.accepts(b" ") and not grammar.accepts(b"{")  # nothing follows the object


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OBJECTS, LAYOUTS, EDITS)
def test_a_mutated_document_is_accepted_exactly_when_json_reads_it_as_an_object(document, layout, edits):
    text = edited(json.dumps(document, **{**layout, "ensure_ascii": False}).encode(), edits)
    assume(within_caps(text))
    grammar = fed_whole(text)
    # The answer is its object: blanks before or after it are not taken, where json.loads reads them.
    expected = reads_as_object(text) and not text[-1:].isspace() and not text[:1].isspace()
    assert (grammar is not None and grammar.complete) == expected, text


@pytest.mark.parametrize("text", [
    b'{"a": 01}', b'{"a": 1.}', b'{"a": .5}', b'{"a": 1e}', b'{"a": -}', b'{"a": +1}', b'{"a": NaN}',
    b'{"a": tru}', b'{"a": [1,]}', b'{"a": 1,}', b'{a: 1}', b"{'a': 1}", b'{"a" 1}', b'{"a": "\x01"}',
    b'{"a": "\\x"}', b'{"a": "\\u12G4"}', b'{"a": "\xc0\xaf"}', b'{"a": "\xed\xa0\x80"}', b'{"a": "\xf4\x90\x80\x80"}',
    b'[1]', b'"a"', b'1', b'{"a": 1}}', b'{"a": [1}',
])
def test_what_is_not_one_json_object_is_refused(text):
    grammar = fed_whole(text)
    assert grammar is None or not grammar.complete
    assert not reads_as_object(text)


def test_the_caps_on_depth_and_blanks():
    assert fed_whole(b'{"a":' + b"[" * 127 + b"]" * 127 + b"}").complete  # 128 open at once
    assert fed_whole(b'{"a":' + b"[" * 128) is None
    assert fed_whole(b"{" + b" " * 20 + b"}").complete
    assert fed_whole(b"{" + b" " * 21) is None
    assert fed_whole(b" {}") is None and fed_whole(b"{} ") is None
    assert fed_whole(b'{"a": "' + b" " * 1000 + b'"}').complete  # blanks inside a string are text


def test_a_refused_byte_changes_nothing():
    grammar = _core.JsonGrammar()
    assert grammar.feed(b'{"a": 1')
    assert not grammar.feed(b"x") and not grammar.feed(b"1.x")
    assert grammar.feed(b".5}") and grammar.complete
    assert math.isclose(json.loads('{"a": 1.5}')["a"], 1.5)
