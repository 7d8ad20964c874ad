"""http/protocol.py: every field is validated, and the error names the field."""

import base64
import json

import pytest

from mlxrunner.errors import RequestError
from mlxrunner.http import protocol
from mlxrunner.http.protocol import DetokenizeRequest, StreamError, TokenizeRequest
from mlxrunner.request import Limits

LIMITS = Limits()


@pytest.mark.parametrize("raw, message", [
    (b"", "request body is empty"),
    (b"{", "request body is not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got an array"),
    (b"\xff\xfe", "not valid"),
])
def test_bad_bodies(raw, message):
    with pytest.raises(RequestError, match=message):
        protocol.parse_json_body(raw)


def test_completion_defaults_and_zero_meaning_default():
    req = protocol.parse_completion({"prompt": "a cat", "width": 0, "height": 0, "steps": 0, "unknown": 1}, LIMITS)
    assert (req.width, req.height, req.steps, req.seed) == (None, None, None, None)


def test_completion_seed_zero_is_a_seed():
    assert protocol.parse_completion({"prompt": "x", "seed": 0}, LIMITS).seed == 0
    assert protocol.parse_completion({"prompt": "x", "seed": -(2**63)}, LIMITS).seed == -(2**63)


@pytest.mark.parametrize("body, message", [
    ({}, 'field "prompt" is required'),
    ({"prompt": 3}, 'field "prompt" must be a string, got a number'),
    ({"prompt": "x", "width": "512"}, 'field "width" must be an integer, got a string'),
    ({"prompt": "x", "width": True}, 'field "width" must be an integer, got a boolean'),
    ({"prompt": "x", "width": 512.5}, 'field "width" must be an integer'),
    ({"prompt": "x", "width": -1}, 'field "width" must be between 0 and'),
    ({"prompt": "x", "width": 4096, "height": 4096}, 'exceed the limit of 4194304 pixels'),
    ({"prompt": "x", "steps": 201}, 'field "steps" must be between 0 and 200'),
    ({"prompt": "x", "seed": 2**64}, 'field "seed" must be between'),
    ({"prompt": "x", "guidance": "high"}, 'field "guidance" must be a number'),
    ({"prompt": "x", "negative_prompt": ["a"]}, 'field "negative_prompt" must be a string, got an array'),
    ({"prompt": "x", "images": "abc"}, 'field "images" must be an array'),
    ({"prompt": "x", "images": [1]}, 'field "images\\[0\\]" must be a base64 string'),
    ({"prompt": "x", "images": ["not base64!"]}, 'field "images\\[0\\]" is not valid base64'),
    ({"prompt": "x", "images": ["AAAA"] * 5}, 'has 5 images; the maximum is 4'),
    ({"prompt": "x", "options": []}, 'field "options" must be an object'),
    ({"prompt": "x", "options": {"temperature": "hot"}}, 'field "options.temperature" must be a number'),
    ({"prompt": "x", "options": {"top_p": 1.5}}, 'field "options.top_p" must be between 0 and 1'),
    ({"prompt": "x", "options": {"top_k": -1}}, 'field "options.top_k" must be between 0'),
    ({"prompt": "x", "options": {"stop": [1]}}, 'field "options.stop" must be a list of strings'),
    ({"prompt": "x", "options": {"stop": [""]}}, 'must not contain an empty string'),
])
def test_completion_errors_name_the_field(body, message):
    with pytest.raises(RequestError, match=message) as info:
        protocol.parse_completion(body, LIMITS)
    assert info.value.status == 400


def test_completion_images_and_options_parse():
    png = b"\x89PNG\r\n\x1a\n"
    req = protocol.parse_completion({
        "prompt": "edit", "width": 512.0, "images": [base64.b64encode(png).decode(),
                                                     "data:image/png;base64," + base64.b64encode(png).decode()],
        "options": {"temperature": 0, "top_k": 40, "stop": "END", "seed": 7, "num_predict": -1}}, LIMITS)
    assert req.width == 512 and req.images == [png, png]
    assert req.options.temperature == 0.0 and req.options.top_k == 40 and req.options.stop == ["END"]
    assert req.options.seed == 7 and req.options.num_predict == -1


def test_embedding_forms():
    ollama = protocol.parse_embedding({"content": "hi"}, LIMITS)
    assert ollama.ollama_form and ollama.inputs == ["hi"] and ollama.truncate and ollama.normalize is None
    batch = protocol.parse_embedding({"input": ["a", "b"], "normalize": False, "truncate": False}, LIMITS)
    assert not batch.ollama_form and batch.inputs == ["a", "b"] and batch.normalize is False and not batch.truncate
    assert protocol.parse_embedding({"input": "a"}, LIMITS).inputs == ["a"]


@pytest.mark.parametrize("body, message", [
    ({}, 'field "input" .* or "content" .* is required'),
    ({"input": 5}, 'field "input" must be a string or a list of strings, got a number'),
    ({"input": []}, 'must not be an empty list'),
    ({"input": ["a", None]}, 'field "input\\[1\\]" must be a string, got null'),
    ({"content": 1}, 'field "content" must be a string'),
    ({"input": "a", "normalize": "yes"}, 'field "normalize" must be true or false'),
    ({"input": "a", "truncate": 1}, 'field "truncate" must be true or false'),
    ({"input": ["a"] * 3000}, 'has 3000 items; the maximum is 2048'),
])
def test_embedding_errors_name_the_field(body, message):
    with pytest.raises(RequestError, match=message):
        protocol.parse_embedding(body, LIMITS)


def test_tokenize_and_detokenize_fields():
    assert protocol.parse_tokenize({"content": "x"}) == TokenizeRequest("x")
    assert protocol.parse_detokenize({"tokens": [1, 2]}) == DetokenizeRequest([1, 2])
    with pytest.raises(RequestError, match='field "content" is required'):
        protocol.parse_tokenize({})
    with pytest.raises(RequestError, match='field "tokens\\[1\\]" must be a non-negative integer'):
        protocol.parse_detokenize({"tokens": [1, -2]})
    with pytest.raises(RequestError, match='field "tokens" must be an array'):
        protocol.parse_detokenize({"tokens": "1 2"})


def test_ndjson_lines_are_single_non_blank_lines():
    line = protocol.ndjson_line({"content": "a\nb", "done": False, "text": "é"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"content": "a\nb", "done": False, "text": "é"}
    err = StreamError("boom").to_json()
    assert err == {"error": "boom", "content": "error: boom", "done": True}


def test_ndjson_line_puts_base64_bytes_in_as_a_string():
    png = base64.b64encode(bytes(range(256)) * 3)
    done = protocol.ImageDone(image=png, seed=7, width=64, height=48, steps=2, timings_ms={"total": 1.5})
    line = protocol.ndjson_line(done.to_json())
    assert line.startswith(b'{"image":"') and line.count(b"\n") == 1
    parsed = json.loads(line)
    assert base64.b64decode(parsed.pop("image")) == bytes(range(256)) * 3
    assert parsed == {"seed": 7, "width": 64, "height": 48, "steps": 2, "done": True, "timings": {"total_ms": 1.5}}
    assert json.loads(protocol.ndjson_line({"image": b"QUJD"})) == {"image": "QUJD"}
