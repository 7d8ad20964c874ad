"""Property-based fuzzing of every route's body parser, called directly: whatever the bytes, the
parser returns a request or raises RequestError (a 4xx naming the problem), never anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxrunner.errors import RequestError
from mlxrunner.http import mlx_engine, openai_response_types, openai_types, protocol
from mlxrunner.request import Limits

LIMITS = Limits()
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, lone surrogates and huge integers included (json.dumps writes both).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
FIELDS = ["prompt", "content", "input", "tokens", "options", "images", "width", "height", "steps", "seed",
          "negative_prompt", "guidance", "normalize", "truncate", "encoding_format", "dimensions", "model",
          # OpenAI's and --mlx-engine's
          "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "stream",
          "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice", "size", "response_format",
          "guidance_scale", "output_format", "output_compression", "background", "format", "grammar", "logit_bias",
          "Prompt", "Options", "Logprobs", "TopLogprobs",
          # the Responses API's
          "instructions", "max_output_tokens", "text", "include", "previous_response_id", "store", "metadata",
          "parallel_tool_calls", "reasoning", "truncation"]
OPTION_FIELDS = ["num_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                 "presence_penalty", "frequency_penalty", "seed", "stop"]
bodies = st.fixed_dictionaries({}, optional={name: json_values for name in FIELDS}).flatmap(
    lambda body: st.fixed_dictionaries(
        {}, optional={name: json_values for name in OPTION_FIELDS}).map(
        lambda options: {**body, "options": options} if "options" in body and options else body))

PARSERS = {
    "/completion": lambda body: protocol.parse_completion(body, LIMITS),
    "/embedding": lambda body: protocol.parse_embedding(body, LIMITS),
    "/tokenize": protocol.parse_tokenize,
    "/detokenize": protocol.parse_detokenize,
    "/v1/embeddings": lambda body: openai_types.parse_openai_embedding(body, LIMITS, 384),
    "/v1/chat/completions": lambda body: openai_types.parse_chat(body, LIMITS),
    "/v1/completions": lambda body: openai_types.parse_text_completion(body, LIMITS),
    "/v1/images/generations": lambda body: openai_types.parse_image_request(body, LIMITS),
    "/v1/responses": lambda body: openai_response_types.parse_responses(body, LIMITS),
    "--mlx-engine /completion": lambda body: mlx_engine.parse_request(body, LIMITS),
}


def parses_or_refuses(parse, body) -> None:
    try:
        parse(body)
    except RequestError as exc:
        assert 400 <= exc.status < 500 and str(exc)


@pytest.mark.parametrize("route", sorted(PARSERS))
@FUZZ
@given(body=bodies)
def test_every_parser_returns_a_request_or_a_request_error(route, body):
    parses_or_refuses(PARSERS[route], body)


# The Responses API's input items: known and unknown types, with any of their fields, of any value.
content_parts = st.lists(st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["input_text", "output_text", "refusal", "input_image", "reasoning_text"]) | json_values,
    "text": json_values, "refusal": json_values}), max_size=3)
response_items = st.lists(st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "item_reference",
                             "web_search_call"]) | json_values,
    "role": st.sampled_from(["user", "assistant", "system", "developer"]) | json_values,
    "content": content_parts | json_values, "summary": content_parts | json_values,
    "output": content_parts | json_values, "call_id": json_values, "name": json_values,
    "arguments": json_values}), max_size=5)


@FUZZ
@given(items=response_items, body=bodies)
def test_any_responses_input_is_a_conversation_or_a_request_error(items, body):
    parses_or_refuses(PARSERS["/v1/responses"], {**body, "input": items})


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_are_a_json_object_or_a_request_error(raw):
    try:
        assert isinstance(protocol.parse_json_body(raw), dict)
    except RequestError as exc:
        assert exc.status == 400


# The text field each route reads (the embedding routes' `input` does not go through str_field).
TEXT_FIELDS = {"/completion": "prompt", "/embedding": "input", "/tokenize": "content", "/v1/embeddings": "input"}


@FUZZ
@given(text=st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
       route=st.sampled_from(sorted(TEXT_FIELDS)), as_list=st.booleans())
def test_lone_surrogates_are_refused_naming_the_field(text, route, as_list):
    field_name = TEXT_FIELDS[route]
    value = f"x{text}"
    if as_list and field_name == "input":
        value, field_name = ["fine", value], "input[1]"
    with pytest.raises(RequestError, match="surrogate") as caught:
        PARSERS[route]({TEXT_FIELDS[route]: value})
    assert caught.value.field == field_name and caught.value.status == 400


@pytest.mark.parametrize("raw, expected", [
    (b"[" * 10_000 + b"]" * 10_000, "nests arrays or objects too deeply"),
    (b'{"a": ' * 10_000 + b"1" + b"}" * 10_000, "nests arrays or objects too deeply"),
    (b'{"seed": ' + b"9" * 5_000 + b"}", "Exceeds the limit"),
])
def test_deep_nesting_and_huge_integers_are_400(raw, expected):
    with pytest.raises(RequestError, match=expected):
        protocol.parse_json_body(raw)


@pytest.mark.parametrize("body, field_name", [
    ({"prompt": "a", "options": {"stop": ["ok", "\ud800"]}}, "options.stop[1]"),
    ({"prompt": "a", "negative_prompt": "\udfff"}, "negative_prompt"),
    ({"input": ["ok", "\ud800"]}, "input[1]"),
    ({"content": "\ud800"}, "content"),
])
def test_surrogates_in_every_text_field_name_it(body, field_name):
    parse = PARSERS["/completion"] if "prompt" in body else PARSERS["/embedding"]
    with pytest.raises(RequestError) as caught:
        parse(body)
    assert caught.value.field == field_name
