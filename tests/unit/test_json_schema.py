"""Answers held to a JSON schema: text/json_schema.py's compiler and the C++ recogniser it feeds, against the
jsonschema package's validator and documents Hypothesis draws from each schema (`documents`, below: it reads the
JSON schema itself, not the compiled nodes).

Every document a schema allows (written as json.dumps writes it, within the recogniser's caps) is accepted byte by
byte and complete only at its end; every text the recogniser takes whole is a document the validator accepts. A
schema that cannot be held to is refused with the path to what cannot be.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from json_mutations import EDITS, edited
from pydantic import BaseModel, ConfigDict, Field

from mlxrunner import _core
from mlxrunner.llm.model import core_schema
from mlxrunner.text.json_schema import SchemaError, compile_schema


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Literal["cat", "dog", "hamster"]
    age: int | None = None


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    height: float
    pets: list[Pet]
    scores: dict[str, int]
    nickname: str | None = None
    verified: bool = False


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=2, max_length=4)
    stars: int = Field(ge=1, le=5)
    tags: list[str] = Field(min_length=1, max_length=3)
    score: int = Field(gt=-3, lt=3)


class Tree(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    children: list[Tree] = []


SCHEMAS = {
    "person (pydantic, $defs, Optional, dict, enum)": Person.model_json_schema(),
    "tree (recursive $ref)": Tree.model_json_schema(),
    "review (lengths, items, small integer ranges)": Review.model_json_schema(),
    "any object": {"type": "object"},
    "enums and consts": {"type": "object", "additionalProperties": False, "required": ["a", "b", "c"],
                         "properties": {"a": {"enum": [1, 2.5, -3, "x", True, None]}, "b": {"const": "fixed"},
                                        "c": {"type": ["integer", "null"]}, "d": {"enum": [10, 100, 1000]}}},
    "arrays of anything": {"type": "object", "additionalProperties": False,
                           "properties": {"xs": {"type": "array"}, "ys": {"type": "array", "items": {
                               "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "array",
                                                                                   "items": {"type": "boolean"}}]}}}},
    "named and other keys": {"type": "object", "properties": {"a": {"type": "integer"}},
                             "additionalProperties": {"type": "string"}},
    "escaped keys": {"type": "object", "additionalProperties": False, "required": ['a"b', "c\\d"],
                     "properties": {'a"b': {"type": "string"}, "c\\d": {"type": "integer"}, "e/f": {}}},
}
LAYOUTS = st.sampled_from([{}, {"indent": 1}, {"separators": (",", ":")}, {"indent": "\t"}])


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)


def documents(schema, root: dict, depth: int = 0) -> st.SearchStrategy:
    """Documents `schema` allows (within the subset text/json_schema.py takes; `root` holds its $defs)."""
    if schema is True or schema == {}:
        return JSON_VALUES
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/") if schema["$ref"] != "#" else []:
            target = target[part]
        return documents(target, root, depth + 1)
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return st.one_of([documents(branch, root, depth) for branch in schema[union]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([documents({**schema, "type": k}, root, depth) for k in kind])
    if kind == "object" or (kind is None and "properties" in schema):
        return _objects(schema, root, depth)
    if kind == "array":
        items = schema.get("items", True)
        low, high = schema.get("minItems", 0), schema.get("maxItems", 3)
        return st.lists(documents(items, root, depth + 1), min_size=low, max_size=low if depth > 3 else high)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 8))
    if kind == "integer" and schema.keys() & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
        low = max(schema.get("minimum", -10**9), schema.get("exclusiveMinimum", -10**9 - 1) + 1)
        high = min(schema.get("maximum", 10**9), schema.get("exclusiveMaximum", 10**9 + 1) - 1)
        return st.integers(low, high)
    simple = {"integer": st.integers(-10**12, 10**12), "boolean": st.booleans(),
              "null": st.none(), "number": st.integers(-1000, 1000) | st.floats(allow_nan=False,
                                                                                 allow_infinity=False)}
    return simple[kind] if kind in simple else JSON_VALUES


def _objects(schema: dict, root: dict, depth: int) -> st.SearchStrategy:
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    additional = schema.get("additionalProperties", not properties)

    @st.composite
    def draw_object(draw):
        names = [n for n in properties if n in required or draw(st.booleans())]
        names = draw(st.permutations(names))
        document = {name: draw(documents(properties[name], root, depth + 1)) for name in names}
        if additional is not False and depth <= 3:
            extra = draw(st.dictionaries(st.text(max_size=4).filter(lambda k: k not in properties),
                                         documents(additional, root, depth + 1), max_size=2))
            document.update(extra)
        return document

    return draw_object()


def grammar_for(schema: dict) -> tuple[_core.JsonSchema, _core.JsonGrammar]:
    compiled = core_schema(compile_schema(schema))
    return compiled, _core.JsonGrammar(compiled)


def within_caps(text: bytes) -> bool:
    return not re.search(rb"[ \t\n\r]{21}", text)


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_document_a_schema_allows_is_accepted(name):
    schema = SCHEMAS[name]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(documents(schema, schema), LAYOUTS)
    def check(document, layout):
        jsonschema.validate(document, schema)  # the generator makes what the schema allows
        text = json.dumps(document, ensure_ascii=False, **layout).encode()
        assume(within_caps(text))
        compiled, grammar = grammar_for(schema)
        for index, byte in enumerate(text):
            assert not grammar.complete, text[:index]
            assert grammar.feed(bytes([byte])), (text[:index + 1], text)
        assert grammar.complete

    check()


@pytest.mark.parametrize("name", SCHEMAS)
def test_what_the_recogniser_takes_whole_the_validator_accepts(name):
    schema = SCHEMAS[name]

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(documents(schema, schema), EDITS)
    def check(document, edits):
        text = edited(json.dumps(document, ensure_ascii=False).encode(), edits)
        compiled, grammar = grammar_for(schema)
        if grammar.feed(text) and grammar.complete:
            jsonschema.validate(json.loads(text.decode("utf-8")), schema)

    check()


@pytest.mark.parametrize("text, accepted", [
    (b'{"name": "Rex", "kind": "cat"}', True),
    (b'{"kind": "dog", "name": "Rex", "age": null}', True),
    (b'{"name": "Rex"}', False),  # a required key missing: the object may not close
    (b'{"name": "Rex", "kind": "cow"}', False),  # not one of the enum
    (b'{"name": "Rex", "kind": "cat", "colour": "red"}', False),  # no other keys
    (b'{"name": "Rex", "name": "Max", "kind": "cat"}', False),  # a key twice
    (b'{"name": 1, "kind": "cat"}', False),
    (b'{"name": "Rex", "kind": "cat", "age": 1.5}', False),  # an integer
])
def test_a_pet(text, accepted):
    _, grammar = grammar_for(Pet.model_json_schema())
    assert (grammar.feed(text) and grammar.complete) == accepted


def test_a_named_key_written_again_is_not_taken_as_another_key():
    _, grammar = grammar_for(SCHEMAS["named and other keys"])
    assert grammar.feed(b'{"a": 1, "ab": "x", "b": "y"')
    assert not grammar.accepts(b', "a"')  # its value would replace the integer with a string
    assert grammar.accepts(b', "a') and grammar.accepts(b', "c": "z"}')


def test_lengths_and_counts_are_counted_in_characters_and_items():
    _, grammar = grammar_for(Review.model_json_schema())
    assert grammar.feed('{"code": "é\\u00e9'.encode())  # two characters: one in UTF-8, one escaped
    assert grammar.accepts(b'xy"') and not grammar.accepts(b'xyz')  # a fourth fits, a fifth would not
    assert grammar.feed(b'\\ud83d\\ude00\\ud83d\\ude00') and not grammar.accepts(b"x")  # a pair is one
    assert grammar.feed(b'"')
    assert grammar.feed(b', "stars": 5, "tags": [') and not grammar.accepts(b"]")  # at least one tag
    assert grammar.feed(b'"a", "b", "c"') and not grammar.accepts(b",")  # at most three
    assert not grammar.accepts(b'], "score": 3') and grammar.accepts(b'], "score": -2}')


def test_a_finished_object_takes_no_comma():
    _, grammar = grammar_for(Pet.model_json_schema())
    assert grammar.feed(b'{"name": "Rex", "kind": "cat", "age": 3')
    assert not grammar.accepts(b",")  # every key is written: nothing could follow a comma
    assert grammar.accepts(b"}")


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}}, "schema.properties.a.pattern"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}, "properties.a: an integer range"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 64}}}, "at most 64 values"),
    ({"type": "object", "properties": {"a": {"type": "number", "maximum": 1}}}, "on integers only"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 3, "maxLength": 2}}}, "is above"),
    ({"type": "object", "properties": {"a": {"type": "array", "maxItems": -1}}}, "schema.properties.a.maxItems"),
    ({"type": "array"}, "root must be an object"),
    ({"anyOf": [{"type": "object"}, {"type": "null"}]}, "root must be an object"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "object"}, {"type": "object", "properties": {}}]}}},
     "schema.properties.a.anyOf"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "schema.properties.a.$ref"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "names nothing"),
    ({"type": "object", "properties": {"a": {"enum": [{"x": 1}]}}}, "schema.properties.a.enum"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, '"b" is not one of its properties'),
    ({"type": "object", "properties": {"a": {"type": "str"}}}, 'unknown type "str"'),
    ({"type": "object", "properties": {f"k{i}": {} for i in range(65)}}, "at most 64"),
])
def test_a_schema_that_cannot_be_held_to_is_refused_naming_where(schema, where):
    with pytest.raises(SchemaError, match=re.escape(where)):
        compile_schema(schema)


def test_the_recogniser_checks_the_nodes_it_is_given():
    node = _core.SchemaNode()
    node.kinds = 1
    node.items = 7  # no such node
    with pytest.raises(ValueError, match="names is missing"):
        _core.JsonSchema([_core.SchemaNode(), node], 1)


SCHEMA_WORDS = st.sampled_from(["type", "properties", "required", "additionalProperties", "items", "enum", "const",
                                "anyOf", "oneOf", "allOf", "$ref", "$defs", "object", "array", "string", "integer",
                                "number", "boolean", "null", "#", "#/$defs/a", "a", "pattern", "title"])
SCHEMA_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | SCHEMA_WORDS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SCHEMA_WORDS, inner, max_size=5), max_leaves=25)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(SCHEMA_LIKE, st.lists(st.binary(max_size=6) | st.sampled_from([b"{", b"}", b'"a"', b":", b"1", b",", b"[",
                                                                     b"]", b"null", b'"', b" "]), max_size=30))
def test_any_json_as_a_schema_compiles_or_is_refused_with_a_schema_error(value, pieces):
    try:
        compiled = compile_schema(value)
    except SchemaError:
        return
    grammar = _core.JsonGrammar(core_schema(compiled))  # the C++ side's own checks pass too
    for piece in pieces:  # whatever comes, the recogniser takes it or refuses it whole
        before = grammar.complete
        if not grammar.feed(piece):
            assert grammar.complete == before
