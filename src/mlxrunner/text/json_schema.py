"""A JSON schema -> the nodes the C++ recogniser follows (csrc/text/json_grammar.h), for answers held to it.

Enforced: `type` (one or a list), `properties`, `required`, `additionalProperties`, `items`, `enum` and `const`
(of strings, numbers, booleans, null), `minLength` / `maxLength`, `minItems` / `maxItems`, an integer's
`minimum` / `maximum` (and the exclusive forms) when they bound at most 64 values, `anyOf` / `oneOf` whose
branches are of different kinds (an object or null, a string or a number...), `allOf` of one schema, and `$ref`
to `#`, `#/$defs/...` or `#/definitions/...` (recursive ones too): what Pydantic's `model_json_schema()` and
OpenAI's strict structured outputs write. Annotations are ignored (`title`, `description`, `default`, `format`,
...). A keyword that limits values further (`pattern`, `multipleOf`, a number's range, `uniqueItems`, ...) is
refused with the path to it: the answer could not be promised to follow the schema.

Three choices where JSON Schema leaves room:
- without `additionalProperties`, an object that names properties holds only those (JSON Schema would allow any
  other key; a model held to the schema then writes no keys nobody asked for, as OpenAI's strict mode requires);
  one that names none holds any keys;
- keys are written as `json.dumps` writes them (UTF-8, escapes only where JSON needs them);
- the root is an object, as OpenAI requires.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# The kinds of value, as csrc/text/json_grammar.h numbers them.
OBJECT, ARRAY, STRING, NUMBER, INTEGER, BOOLEAN, NULL = 1, 2, 4, 8, 16, 32, 64
ANY = 127
TYPE_KINDS = {"object": OBJECT, "array": ARRAY, "string": STRING, "number": NUMBER | INTEGER, "integer": INTEGER,
              "boolean": BOOLEAN, "null": NULL}
# Kinds whose values start with the same byte: a value's first byte must tell anyOf's branches apart.
FIRST_BYTE_CLASSES = (OBJECT, ARRAY, STRING, NUMBER | INTEGER, BOOLEAN, NULL)

MAX_KEYS = 64
MAX_LITERALS = 64
MAX_NODES = 4096
RANGE_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "format",
                         "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType", "$defs",
                         "definitions", "discriminator", "nullable", "strict"})
REFUSED = frozenset({"pattern", "multipleOf", "uniqueItems", "minProperties",
                     "maxProperties", "not", "if", "then", "else", "patternProperties", "propertyNames",
                     "dependentRequired", "dependentSchemas", "dependencies", "prefixItems", "contains",
                     "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems", "additionalItems",
                     "$dynamicRef", "$recursiveRef"})


class SchemaError(ValueError):
    """A schema this runner cannot hold an answer to; the message names where in the schema."""


@dataclass
class Node:
    """One place of a document: as csrc/text/json_grammar.h's SchemaNode."""

    kinds: int = ANY
    literal_kinds: int = 0  # the kinds whose values must be one of `literals`
    literals: list[str] = field(default_factory=list)  # canonical JSON texts
    keys: list[str] = field(default_factory=list)  # JSON string contents, no quotes
    key_nodes: list[int] = field(default_factory=list)
    required: int = 0  # bit i: keys[i]
    additional: int = -1  # the node of other keys' values; -1: no other keys
    items: int = 0  # the node of an array's items
    min_length: int = 0  # a string's characters
    max_length: int = -1  # -1: any number
    min_items: int = 0  # an array's items
    max_items: int = -1


def any_value() -> Node:
    return Node(additional=0, items=0)


@dataclass(frozen=True)
class CompiledSchema:
    nodes: list[Node]
    root: int


def compile_schema(schema: Any) -> CompiledSchema:
    """The nodes for `schema` (a JSON schema as parsed JSON); a SchemaError saying where it cannot be held to."""
    compiler = _Compiler(schema)
    root = compiler.place(schema, "schema")
    if compiler.nodes[root].kinds != OBJECT or compiler.nodes[root].literal_kinds:
        raise SchemaError("the schema's root must be an object (\"type\": \"object\")")
    return CompiledSchema(compiler.nodes, root)


class _Compiler:
    def __init__(self, document: Any):
        self.document = document
        self.nodes: list[Node] = [any_value()]  # node 0: any value
        self.refs: dict[str, int] = {}

    def place(self, schema: Any, path: str) -> int:
        """The index of the node for `schema`, compiled now or (a $ref seen before) earlier."""
        if schema is True or schema == {}:
            return 0
        if isinstance(schema, dict) and "$ref" in schema:
            self._check_ref_alone(schema, path)
            ref = schema["$ref"]
            self._resolve(ref, path)  # a SchemaError for a reference that names nothing here
            if ref not in self.refs:
                self.refs[ref] = self._reserve(path)
                self.nodes[self.refs[ref]] = self.compile(self._resolve(ref, path), f"{path}.$ref")
            return self.refs[ref]
        index = self._reserve(path)
        self.nodes[index] = self.compile(schema, path)
        return index

    def compile(self, schema: Any, path: str, depth: int = 0) -> Node:
        if depth > 32:
            raise SchemaError(f"{path}: $ref, anyOf and allOf nest too deeply")
        if schema is True or schema == {}:
            return any_value()
        if not isinstance(schema, dict):
            raise SchemaError(f"{path} must be an object (a schema), got {json.dumps(schema)[:40]}")
        refused = sorted(REFUSED & schema.keys())
        if refused:
            raise SchemaError(f"{path}.{refused[0]}: this runner cannot hold an answer to {refused[0]!r} (supported: "
                              "type, properties, required, additionalProperties, items, enum, const, minLength, "
                              "maxLength, minItems, maxItems, an integer range of at most 64 values, anyOf, $ref)")
        if "$ref" in schema:
            self._check_ref_alone(schema, path)
            return self.compile(self._resolve(schema["$ref"], path), f"{path}.$ref", depth + 1)
        if "allOf" in schema:
            branches = schema["allOf"]
            if not isinstance(branches, list) or len(branches) != 1:
                raise SchemaError(f"{path}.allOf: only an allOf of one schema is supported")
            return self.compile(branches[0], f"{path}.allOf[0]", depth + 1)
        for union in ("anyOf", "oneOf"):
            if union in schema:
                branches = schema[union]
                if not isinstance(branches, list) or not branches:
                    raise SchemaError(f"{path}.{union} must be a non-empty array of schemas")
                return self._merge([self.compile(b, f"{path}.{union}[{i}]", depth + 1) for i, b in enumerate(branches)],
                                   f"{path}.{union}")
        return self._plain(schema, path)

    def _plain(self, schema: dict, path: str) -> Node:
        node = Node(kinds=self._kinds(schema, path), additional=-1, items=0)
        if schema.keys() & RANGE_KEYWORDS:
            allowed = self._integer_range(schema, path)
            enum = schema.get("enum")
            if isinstance(enum, list):
                allowed = [v for v in enum if isinstance(v, int) and not isinstance(v, bool) and v in allowed]
            schema = {**schema, "enum": allowed}
        if "enum" in schema or "const" in schema:
            self._literals(node, schema, path)
        node.min_length, node.max_length = self._bounds(schema, "minLength", "maxLength", path)
        node.min_items, node.max_items = self._bounds(schema, "minItems", "maxItems", path)
        if node.kinds & OBJECT:
            self._object(node, schema, path)
        if node.kinds & ARRAY and "items" in schema:
            items = schema["items"]
            node.items = 0 if items is True else self.place(items, f"{path}.items")
        return node

    @staticmethod
    def _bounds(schema: dict, low: str, high: str, path: str) -> tuple[int, int]:
        """(minimum, maximum or -1) of a count (a string's length, an array's items)."""
        bounds = []
        for name, absent in ((low, 0), (high, -1)):
            value = schema.get(name, absent)
            if name in schema and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SchemaError(f"{path}.{name} must be a count (an integer >= 0), got {json.dumps(value)[:40]}")
            bounds.append(value)
        if bounds[1] >= 0 and bounds[1] < bounds[0]:
            raise SchemaError(f"{path}: {low} {bounds[0]} is above {high} {bounds[1]}")
        return bounds[0], bounds[1]

    @staticmethod
    def _integer_range(schema: dict, path: str) -> list[int]:
        """The integers of a small range (minimum/maximum and their exclusive forms), held to as an enum: the
        recogniser follows a value's text, not its size."""
        if schema.get("type") != "integer":
            raise SchemaError(f"{path}: a range (minimum, maximum) is supported on integers only, as a small set")
        bounds = {}
        for name in RANGE_KEYWORDS & schema.keys():
            value = schema[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SchemaError(f"{path}.{name} must be a number")
            bounds[name] = value
        lows = ([math.ceil(bounds["minimum"])] if "minimum" in bounds else []) + (
            [math.floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else [])
        highs = ([math.floor(bounds["maximum"])] if "maximum" in bounds else []) + (
            [math.ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else [])
        low, high = max(lows, default=None), min(highs, default=None)
        if low is None or high is None or high - low + 1 > MAX_LITERALS:
            raise SchemaError(f"{path}: an integer range is held to as a set of at most {MAX_LITERALS} values: give "
                              "both ends, at most that far apart")
        if high < low:
            raise SchemaError(f"{path}: the range holds no integer")
        return list(range(low, high + 1))

    def _kinds(self, schema: dict, path: str) -> int:
        kind = schema.get("type")
        if kind is None:
            if schema.keys() & {"properties", "required", "additionalProperties"}:
                return OBJECT
            if "items" in schema:
                return ARRAY
            return ANY
        names = kind if isinstance(kind, list) else [kind]
        kinds = 0
        for name in names:
            if not isinstance(name, str) or name not in TYPE_KINDS:
                raise SchemaError(f"{path}.type: unknown type {json.dumps(name)[:40]}")
            kinds |= TYPE_KINDS[name]
        if not kinds:
            raise SchemaError(f"{path}.type: an empty list allows nothing")
        return kinds

    def _literals(self, node: Node, schema: dict, path: str) -> None:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{path}.enum must be a non-empty array")
        if len(values) > MAX_LITERALS:
            raise SchemaError(f"{path}.enum has {len(values)} values; at most {MAX_LITERALS} are supported")
        kinds = 0
        for value in values:
            value_kind = _kind_of(value, path)
            if value_kind & node.kinds:
                node.literals.append(json.dumps(value, ensure_ascii=False))
                kinds |= value_kind
        if not node.literals:
            raise SchemaError(f"{path}: no value of its enum has its type")
        node.kinds = node.literal_kinds = kinds

    def _object(self, node: Node, schema: dict, path: str) -> None:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise SchemaError(f"{path}.properties must be an object")
        if len(properties) > MAX_KEYS:
            raise SchemaError(f"{path}.properties has {len(properties)} keys; at most {MAX_KEYS} are supported")
        for name, sub in properties.items():
            node.keys.append(json.dumps(name, ensure_ascii=False)[1:-1])
            node.key_nodes.append(self.place(sub, f"{path}.properties.{name}"))
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise SchemaError(f"{path}.required must be an array of property names")
        for name in required:
            if not isinstance(name, str) or name not in properties:
                raise SchemaError(f"{path}.required: {json.dumps(name)[:40]} is not one of its properties")
            node.required |= 1 << list(properties).index(name)
        # Without additionalProperties: only the named keys when it names some, else any (an object of any keys).
        additional = schema.get("additionalProperties", not properties)
        if additional is False:
            node.additional = -1
        elif additional is True:
            node.additional = 0
        else:
            node.additional = self.place(additional, f"{path}.additionalProperties")

    def _merge(self, branches: list[Node], path: str) -> Node:
        """anyOf's branches as one node: each kind of first byte from one branch only."""
        merged = Node(kinds=0, additional=-1, items=0)
        for branch in branches:
            for first_byte_class in FIRST_BYTE_CLASSES:
                if not (branch.kinds & merged.kinds & first_byte_class):
                    continue
                numbers_alone = first_byte_class == NUMBER | INTEGER and not (branch.literal_kinds
                                                                             or merged.literal_kinds)
                if not numbers_alone:
                    raise SchemaError(f"{path}: two branches can both start with the same kind of value; this runner "
                                      "needs anyOf's branches to differ in kind (an object or null, a string or a "
                                      "number, ...)")
            merged.kinds |= branch.kinds
            merged.literal_kinds |= branch.literal_kinds
            merged.literals += branch.literals
            if branch.kinds & OBJECT:
                merged.keys, merged.key_nodes = branch.keys, branch.key_nodes
                merged.required, merged.additional = branch.required, branch.additional
            if branch.kinds & ARRAY:
                merged.items = branch.items
        return merged

    def _reserve(self, path: str) -> int:
        if len(self.nodes) >= MAX_NODES:
            raise SchemaError(f"{path}: the schema has more than {MAX_NODES} parts")
        self.nodes.append(any_value())
        return len(self.nodes) - 1

    def _resolve(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"{path}.$ref: only references within the schema (\"#/$defs/...\") are supported, "
                              f"got {ref!r}")
        target = self.document
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{path}.$ref: {ref!r} names nothing in the schema")
            target = target[part]
        return target

    @staticmethod
    def _check_ref_alone(schema: dict, path: str) -> None:
        beside = sorted(schema.keys() - ANNOTATIONS - {"$ref"})
        if beside:
            raise SchemaError(f"{path}: {beside[0]!r} beside $ref is not supported (put it in what $ref names)")


def _kind_of(value: Any, path: str) -> int:
    if value is None:
        return NULL
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, (int, float)):
        return NUMBER | INTEGER if isinstance(value, int) else NUMBER
    if isinstance(value, str):
        return STRING
    raise SchemaError(f"{path}.enum: only strings, numbers, booleans and null are supported as values")
