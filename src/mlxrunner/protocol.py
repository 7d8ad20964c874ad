"""The wire types and their validation, in one place.

Everything a client can send is checked here before a job is queued, so a handler either has a
well-typed request or a `RequestError` whose message names the field that was wrong. Unknown
fields are ignored (Ollama's Go parent adds fields over time). The contract is
shared/docs/specs/runner_protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class RequestError(ValueError):
    """A client error: HTTP 400 (or `status`), with a message that names the field."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for. Defaults from the protocol spec."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_images: int = 4
    max_image_side: int = 4096
    min_image_side: int = 64
    max_output_pixels: int = 2048 * 2048
    max_steps: int = 200
    max_queue: int = 16
    max_embedding_inputs: int = 2048
    max_num_predict: int = 1 << 20


# --- field readers: each names the field in its error -------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(body: dict, name: str, lo: int, hi: int, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    # JSON numbers like 512.0 are accepted as integers when they are whole.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise RequestError(f'field "{name}" must be an integer, got {_json_type(value)}')
    if not lo <= value <= hi:
        raise RequestError(f'field "{name}" must be between {lo} and {hi}, got {value}')
    return value


def _float_field(body: dict, name: str, lo: float, hi: float, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f'field "{name}" must be a number, got {_json_type(value)}')
    value = float(value)
    if not lo <= value <= hi:
        raise RequestError(f'field "{name}" must be between {lo:g} and {hi:g}, got {value:g}')
    return value


def _str_field(body: dict, name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(f'field "{name}" must be a string, got {_json_type(value)}')
    return value


def _bool_field(body: dict, name: str, default: bool | None = None) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f'field "{name}" must be true or false, got {_json_type(value)}')
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a RequestError saying why not."""
    if not raw.strip():
        raise RequestError("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError("request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {_json_type(body)}")
    return body


# --- /completion --------------------------------------------------------------------------------


@dataclass
class Options:
    """LLM sampling options (`options` in a /completion request). None = the model's default."""

    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def parse_options(value: Any, limits: Limits) -> Options:
    if value is None:
        return Options()
    if not isinstance(value, dict):
        raise RequestError(f'field "options" must be an object, got {_json_type(value)}')

    def named(name: str) -> dict:
        # Errors name the field as the client wrote it: options.temperature.
        return {f"options.{name}": value.get(name)}

    def int_opt(name: str, lo: int, hi: int) -> int | None:
        return _int_field(named(name), f"options.{name}", lo, hi)

    def float_opt(name: str, lo: float, hi: float) -> float | None:
        return _float_field(named(name), f"options.{name}", lo, hi)

    stop = value.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError('field "options.stop" must be a list of strings')
    if any(s == "" for s in stop):
        raise RequestError('field "options.stop" must not contain an empty string')

    return Options(
        # Ollama's -1 (infinite) and -2 (fill context) mean "until the context is full" here.
        num_predict=int_opt("num_predict", -2, limits.max_num_predict),
        temperature=float_opt("temperature", 0.0, 100.0),
        top_k=int_opt("top_k", 0, 1 << 30),
        top_p=float_opt("top_p", 0.0, 1.0),
        min_p=float_opt("min_p", 0.0, 1.0),
        repeat_penalty=float_opt("repeat_penalty", 0.0, 100.0),
        repeat_last_n=int_opt("repeat_last_n", -1, 1 << 30),
        presence_penalty=float_opt("presence_penalty", -100.0, 100.0),
        frequency_penalty=float_opt("frequency_penalty", -100.0, 100.0),
        seed=int_opt("seed", INT64_MIN, INT64_MAX),
        stop=list(stop),
    )


@dataclass
class CompletionRequest:
    prompt: str
    width: int | None = None  # None = the model's default
    height: int | None = None
    steps: int | None = None
    seed: int | None = None  # None = random; the seed used is echoed back
    images: list[bytes] = field(default_factory=list)
    negative_prompt: str | None = None
    guidance: float | None = None
    options: Options = field(default_factory=Options)


def _decode_images(value: Any, limits: Limits) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f'field "images" must be an array of base64 strings, got {_json_type(value)}')
    if len(value) > limits.max_images:
        raise RequestError(f'field "images" has {len(value)} images; the maximum is {limits.max_images}')
    decoded = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RequestError(f'field "images[{i}]" must be a base64 string, got {_json_type(item)}')
        if item.startswith("data:") and "," in item:  # accept data URLs as OpenAI clients send them
            item = item.split(",", 1)[1]
        try:
            decoded.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(f'field "images[{i}]" is not valid base64') from None
    return decoded


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    prompt = _str_field(body, "prompt")
    if prompt is None:
        raise RequestError('field "prompt" is required')
    max_side = limits.max_output_pixels  # a side alone can never exceed the pixel budget
    width = _int_field(body, "width", 0, max_side) or None  # 0 means "default", as Ollama sends it
    height = _int_field(body, "height", 0, max_side) or None
    if width and height and width * height > limits.max_output_pixels:
        raise RequestError(
            f'fields "width" x "height" = {width}x{height} exceed the limit of {limits.max_output_pixels} pixels')
    return CompletionRequest(
        prompt=prompt,
        width=width,
        height=height,
        steps=_int_field(body, "steps", 0, limits.max_steps) or None,
        seed=_int_field(body, "seed", INT64_MIN, INT64_MAX),
        images=_decode_images(body.get("images"), limits),
        negative_prompt=_str_field(body, "negative_prompt"),
        guidance=_float_field(body, "guidance", 0.0, 100.0),
        options=parse_options(body.get("options"), limits),
    )


# --- /embedding, /tokenize, /detokenize ---------------------------------------------------------


@dataclass
class EmbeddingRequest:
    inputs: list[str]
    ollama_form: bool  # {"content": ...} -> {"embedding": [...]}; else {"input": ...} -> {"embeddings": [[...]]}
    normalize: bool | None = None  # None = as the model folder says
    truncate: bool = True


def parse_embedding(body: dict, limits: Limits) -> EmbeddingRequest:
    normalize = _bool_field(body, "normalize")
    truncate = _bool_field(body, "truncate", True)
    if "content" in body and "input" not in body:
        return EmbeddingRequest([_str_field(body, "content") or ""], True, normalize, truncate)
    value = body.get("input")
    if value is None:
        raise RequestError('field "input" (a string or a list of strings) or "content" (a string) is required')
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RequestError(f'field "input[{i}]" must be a string, got {_json_type(item)}')
        inputs = value
    else:
        raise RequestError(f'field "input" must be a string or a list of strings, got {_json_type(value)}')
    if not inputs:
        raise RequestError('field "input" must not be an empty list')
    if len(inputs) > limits.max_embedding_inputs:
        raise RequestError(f'field "input" has {len(inputs)} items; the maximum is {limits.max_embedding_inputs}')
    return EmbeddingRequest(inputs, False, normalize, truncate)


def parse_tokenize(body: dict) -> str:
    content = _str_field(body, "content")
    if content is None:
        raise RequestError('field "content" is required')
    return content


def parse_detokenize(body: dict) -> list[int]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise RequestError(f'field "tokens" must be an array of integers, got {_json_type(tokens)}')
    for i, t in enumerate(tokens):
        if not _is_int(t) or t < 0:
            raise RequestError(f'field "tokens[{i}]" must be a non-negative integer')
    return tokens


# --- responses ----------------------------------------------------------------------------------


def ndjson_line(obj: dict) -> bytes:
    """One NDJSON line. Never blank; compact; non-ASCII kept as UTF-8."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def stream_error(message: str) -> dict:
    """The terminal line for an error after streaming began.

    `error` is the typed signal our clients read. `content` repeats it because Ollama's Go parent
    shows `content` and ignores unknown fields.
    """
    return {"error": message, "content": f"error: {message}", "done": True}
