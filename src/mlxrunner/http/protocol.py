"""The wire types of our runner protocol and their validation.

Everything a client can send is checked here before a job is queued, so a handler either has a
well-typed request or a `RequestError` whose message names the field that was wrong. Unknown
fields are ignored (Ollama's Go parent adds fields over time). Each route's answer is a dataclass
whose `to_json()` is the object sent; OpenAI's wire has its own module, openai_types.py. The bounds on a
request, the sampling options and the field readers are request.py's (the models and the command line use
them too). The contract is docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlxrunner.errors import RequestError
from mlxrunner.request import (
    INT64_MAX,
    INT64_MIN,
    Limits,
    Options,
    bool_field,
    checked_text,
    float_field,
    int_field,
    is_int,
    json_type,
    parse_options,
    str_field,
)
from mlxrunner.text.json_schema import CompiledSchema, SchemaError, compile_schema


class Message(Protocol):
    """A wire message: a route's answer, or one line of a stream."""

    def to_json(self) -> dict:
        """The JSON object sent."""


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a RequestError saying why not."""
    if not raw.strip():
        raise RequestError("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError("request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RequestError("request body is not acceptable JSON: it nests arrays or objects too deeply") from None
    except ValueError as exc:  # Python's limit on integer literals (4,300 digits), among others
        raise RequestError(f"request body is not acceptable JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {json_type(body)}")
    return body


# --- POST /completion: requests -----------------------------------------------------------------


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
    has_options: bool = False  # the client sent "options" (an image model reports it ignored)
    cache_threshold: float | None = None  # the step cache's ("cache": {"threshold": x}); None: off
    vae_tile: int | None = None  # the VAE's tile in pixels; None: tiles above 1024² only, 0: never
    json_output: bool = False  # LLMs: `format`, the answer is one JSON object
    json_schema: CompiledSchema | None = None  # LLMs: `format` as a JSON schema, which the object follows


def _decode_images(value: Any, limits: Limits) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f'field "images" must be an array of base64 strings, got {json_type(value)}',
                           field="images")
    if len(value) > limits.max_images:
        raise RequestError(f'field "images" has {len(value)} images; the maximum is {limits.max_images}',
                           field="images")
    decoded = []
    for i, item in enumerate(value):
        name = f"images[{i}]"
        if not isinstance(item, str):
            raise RequestError(f'field "{name}" must be a base64 string, got {json_type(item)}', field=name)
        if item.startswith("data:") and "," in item:  # accept data URLs as OpenAI clients send them
            item = item.split(",", 1)[1]
        try:
            decoded.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(f'field "{name}" is not valid base64', field=name) from None
    return decoded


def parse_cache(value: Any, limits: Limits) -> float | None:
    """The step cache's threshold from `"cache": {"threshold": x}` (image requests); None: no caching
    (no "cache", or a threshold of 0)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(f'field "cache" must be an object like {{"threshold": 0.05}}, got {json_type(value)}',
                           field="cache")
    for key in value:
        if key != "threshold":
            raise RequestError(f'field "cache.{key}" is not known: "cache" takes "threshold"', field=f"cache.{key}")
    threshold = float_field({"cache.threshold": value.get("threshold")}, "cache.threshold", 0.0,
                             limits.max_cache_threshold)
    if threshold is None:
        raise RequestError('field "cache.threshold" is required in "cache"', field="cache.threshold")
    return threshold or None


def parse_vae_tile(body: dict, limits: Limits) -> int | None:
    """`"vae_tile"`: the VAE's tile side in pixels (0: one pass, never tiled); None when absent (by size)."""
    tile = int_field(body, "vae_tile", 0, limits.max_vae_tile)
    if tile is not None and tile % limits.vae_tile_multiple:
        raise RequestError(f'field "vae_tile" must be 0 or a multiple of {limits.vae_tile_multiple}, got {tile}',
                           field="vae_tile")
    return tile


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    prompt = str_field(body, "prompt")
    if prompt is None:
        raise RequestError('field "prompt" is required', field="prompt")
    if str_field(body, "grammar"):  # Ollama's llama runner took the parent's `format` as a GBNF grammar
        raise RequestError('field "grammar": this runner takes no grammar; `"format": "json"` holds the answer to '
                           "one JSON object", field="grammar")
    max_side = limits.max_output_pixels  # a side alone can never exceed the pixel budget
    width = int_field(body, "width", 0, max_side) or None  # 0 means "default", as Ollama sends it
    height = int_field(body, "height", 0, max_side) or None
    if width and height and width * height > limits.max_output_pixels:
        raise RequestError(
            f'fields "width" x "height" = {width}x{height} exceed the limit of {limits.max_output_pixels} pixels',
            field="width")
    return CompletionRequest(
        prompt=prompt,
        width=width,
        height=height,
        steps=int_field(body, "steps", 0, limits.max_steps) or None,
        seed=int_field(body, "seed", INT64_MIN, INT64_MAX),
        images=_decode_images(body.get("images"), limits),
        negative_prompt=str_field(body, "negative_prompt"),
        guidance=float_field(body, "guidance", 0.0, 100.0),
        options=parse_options(body.get("options"), limits),
        has_options=body.get("options") is not None,
        cache_threshold=parse_cache(body.get("cache"), limits),
        vae_tile=parse_vae_tile(body, limits),
        json_output=body.get("format") not in (None, ""),
        json_schema=parse_format(body.get("format")),
    )


def parse_format(value: Any) -> CompiledSchema | None:
    """Ollama's `format`: "json" holds the answer to one JSON object, a JSON schema to an object it allows (the
    compiled schema is returned); absent or "" leaves the answer free."""
    if value is None or value in ("", "json"):
        return None
    if not isinstance(value, dict):
        raise RequestError(f'field "format" must be "json" or a JSON schema, got {json.dumps(value)[:40]}',
                           field="format")
    try:
        return compile_schema(value)
    except SchemaError as exc:
        raise RequestError(f'field "format": {exc}', field="format") from None


# --- POST /completion: the stream's lines ---------------------------------------------------------


@dataclass(frozen=True)
class TextChunk:
    """An LLM stream line: the next piece of text (valid UTF-8, stop strings withheld)."""

    content: str

    def to_json(self) -> dict:
        return {"content": self.content, "done": False}


@dataclass(frozen=True)
class TextDone:
    """An LLM stream's final line: why it stopped, token counts and durations (ns)."""

    done_reason: str  # stop | length
    stop_reason: str  # eos:<id> | stop:<text> | num_predict | context
    prompt_eval_count: int  # the whole prompt
    prompt_cache_count: int  # how many of prompt_eval_count came from the prompt cache
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int

    def to_json(self) -> dict:
        return {"done": True, "done_reason": self.done_reason, "stop_reason": self.stop_reason,
                "prompt_eval_count": self.prompt_eval_count, "prompt_cache_count": self.prompt_cache_count,
                "prompt_eval_duration": self.prompt_eval_duration, "eval_count": self.eval_count,
                "eval_duration": self.eval_duration}


@dataclass(frozen=True)
class ImageProgress:
    """An image stream line: denoising step `step` of `total` is next (`total` when done)."""

    step: int
    total: int

    def to_json(self) -> dict:
        return {"step": self.step, "total": self.total, "done": False}


@dataclass(frozen=True)
class ImageDone:
    """An image stream's final line: the PNG and how it was made."""

    image: bytes  # base64 PNG (ASCII)
    seed: int
    width: int
    height: int
    steps: int
    timings_ms: dict[str, float]  # per phase: encode, denoise, decode, total
    ignored: list[str] = field(default_factory=list)  # request fields with no effect on this model
    prompt_truncated: bool = False
    # With a step cache: {"threshold", "computed", "skipped"}, transformer evaluations run in full or skipped.
    cache: dict[str, float] | None = None

    def to_json(self) -> dict:
        line: dict[str, Any] = {"image": self.image, "seed": self.seed, "width": self.width, "height": self.height,
                                "steps": self.steps, "done": True,
                                "timings": {f"{phase}_ms": ms for phase, ms in self.timings_ms.items()}}
        if self.ignored:
            line["ignored"] = list(self.ignored)
        if self.prompt_truncated:
            line["prompt_truncated"] = True
        if self.cache is not None:
            line["cache"] = dict(self.cache)
        return line


@dataclass(frozen=True)
class StreamError:
    """The final line for an error after streaming began.

    `error` is the typed signal our clients read. `content` repeats it because Ollama's Go parent
    shows `content` and ignores unknown fields.
    """

    message: str

    def to_json(self) -> dict:
        return {"error": self.message, "content": f"error: {self.message}", "done": True}


def ndjson_line(obj: dict) -> bytes:
    """One NDJSON line. Never blank; compact; non-ASCII kept as UTF-8. A bytes value is ASCII text that
    needs no escaping (an image's base64) and goes into the line as a JSON string in one copy, first."""
    rest = {key: value for key, value in obj.items() if not isinstance(value, bytes)}
    text = json.dumps(rest, ensure_ascii=False, separators=(",", ":")).encode()
    if len(rest) == len(obj):
        return text + b"\n"
    parts = [b"{"]
    for key, value in obj.items():
        if isinstance(value, bytes):
            parts += [json.dumps(key).encode(), b':"', value, b'",']
    if rest:
        parts.append(text[1:])
    else:
        parts[-1] = b'"}'
    parts.append(b"\n")
    return b"".join(parts)


# --- POST /embedding ------------------------------------------------------------------------------


@dataclass
class EmbeddingRequest:
    inputs: list[str]
    ollama_form: bool  # {"content": ...} -> {"embedding": [...]}; else {"input": ...} -> {"embeddings": [[...]]}
    normalize: bool | None = None  # None = as the model folder says
    truncate: bool = True


def parse_embedding(body: dict, limits: Limits) -> EmbeddingRequest:
    normalize = bool_field(body, "normalize")
    truncate = bool_field(body, "truncate", True)
    if "content" in body and "input" not in body:
        return EmbeddingRequest([str_field(body, "content") or ""], True, normalize, truncate)
    value = body.get("input")
    if value is None:
        raise RequestError('field "input" (a string or a list of strings) or "content" (a string) is required',
                           field="input")
    if isinstance(value, str):
        inputs = [checked_text(value, "input")]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RequestError(f'field "input[{i}]" must be a string, got {json_type(item)}', field=f"input[{i}]")
            checked_text(item, f"input[{i}]")
        inputs = value
    else:
        raise RequestError(f'field "input" must be a string or a list of strings, got {json_type(value)}',
                           field="input")
    if not inputs:
        raise RequestError('field "input" must not be an empty list', field="input")
    if len(inputs) > limits.max_embedding_inputs:
        raise RequestError(f'field "input" has {len(inputs)} items; the maximum is {limits.max_embedding_inputs}',
                           field="input")
    return EmbeddingRequest(inputs, False, normalize, truncate)


@dataclass(frozen=True)
class EmbeddingResponse:
    """The Ollama runner form's answer ({"content": ...}): one vector, and the tokens fed to the model."""

    embedding: list[float]
    prompt_eval_count: int

    def to_json(self) -> dict:
        return {"embedding": self.embedding, "prompt_eval_count": self.prompt_eval_count}


@dataclass(frozen=True)
class EmbeddingsResponse:
    """The batch form's answer ({"input": ...}): one vector per input, and the tokens fed to the model."""

    embeddings: list[list[float]]
    prompt_eval_count: int

    def to_json(self) -> dict:
        return {"embeddings": self.embeddings, "prompt_eval_count": self.prompt_eval_count}


# --- POST /tokenize, /detokenize ------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizeRequest:
    content: str


def parse_tokenize(body: dict) -> TokenizeRequest:
    content = str_field(body, "content")
    if content is None:
        raise RequestError('field "content" is required', field="content")
    return TokenizeRequest(content)


@dataclass(frozen=True)
class TokenizeResponse:
    tokens: list[int]  # no special tokens added

    def to_json(self) -> dict:
        return {"tokens": self.tokens}


@dataclass(frozen=True)
class DetokenizeRequest:
    tokens: list[int]


def parse_detokenize(body: dict) -> DetokenizeRequest:
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise RequestError(f'field "tokens" must be an array of integers, got {json_type(tokens)}', field="tokens")
    for i, t in enumerate(tokens):
        if not is_int(t) or t < 0:
            raise RequestError(f'field "tokens[{i}]" must be a non-negative integer', field=f"tokens[{i}]")
    return DetokenizeRequest(tokens)


@dataclass(frozen=True)
class DetokenizeResponse:
    content: str

    def to_json(self) -> dict:
        return {"content": self.content}


# --- errors and /health ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorResponse:
    """The runner protocol's error body; the message names the field that was wrong."""

    message: str

    def to_json(self) -> dict:
        return {"error": self.message}


@dataclass(frozen=True)
class HealthLoading:
    progress: float  # 0..1

    def to_json(self) -> dict:
        return {"status": "loading", "progress": round(self.progress, 4)}


@dataclass(frozen=True)
class HealthReady:
    mode: str
    model: str
    architecture: str  # the pipeline class or transformers architecture: what the web page offers depends on it
    memory: dict[str, int]  # MLX's allocator: active_bytes, cache_bytes, peak_bytes
    backend: dict | None = None  # where MLX computes: name, device, memory_bytes (None: not known, in tests)

    def to_json(self) -> dict:
        ready = {"status": "ok", "mode": self.mode, "model": self.model, "architecture": self.architecture,
                 "memory": self.memory}
        return ready if self.backend is None else {**ready, "backend": self.backend}


@dataclass(frozen=True)
class HealthFailed:
    error: str

    def to_json(self) -> dict:
        return {"status": "error", "error": self.error}
