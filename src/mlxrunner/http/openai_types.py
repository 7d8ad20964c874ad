"""The OpenAI wire: requests parsed and checked, answers and stream chunks as OpenAI's clients read them.

Everything here is plain data: the routes (openai.py, openai_chat.py, openai_images.py) run the jobs. As in
protocol.py, a request is either well typed or a RequestError naming the field (OpenAI's `param`); unknown
fields are ignored (the `openai` client merges `extra_body` keys into the top level). OpenAI routes use
OpenAI's sampling defaults, not Ollama's: temperature 1, top_p 1, no top-k, no repeat penalty, so
temperature 0 is plain greedy. The contract is docs/protocol.md.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlxrunner.errors import RequestError
from mlxrunner.http.protocol import EmbeddingRequest, parse_cache, parse_embedding, parse_vae_tile
from mlxrunner.request import (
    INT64_MAX,
    INT64_MIN,
    Limits,
    Options,
    bool_field,
    float_field,
    int_field,
    json_type,
    str_field,
)
from mlxrunner.text.json_schema import CompiledSchema, SchemaError, compile_schema

if TYPE_CHECKING:
    from mlxrunner.llm.answer import TokenLogprob

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_IMAGES_PER_REQUEST = 4


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class OpenAIError:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    message: str
    type: str  # invalid_request_error (the client's fault) | server_error
    param: str | None = None  # the request field at fault
    code: str | None = None

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- sampling fields, shared by chat and completions ---------------------------------------------------


def parse_sampling(body: dict, limits: Limits) -> Options:
    """OpenAI's sampling fields -> the runner's Options, with OpenAI's defaults for what is left out."""
    n = int_field(body, "n", 1, 128)
    if n not in (None, 1):
        raise RequestError(f'field "n" must be 1: this runner makes one choice per request, got {n}', field="n")
    max_tokens = int_field(body, "max_completion_tokens", 1, limits.max_num_predict)
    if max_tokens is None:
        max_tokens = int_field(body, "max_tokens", 1, limits.max_num_predict)
    return Options(
        num_predict=max_tokens,
        temperature=float_field(body, "temperature", 0.0, 2.0, default=1.0),
        top_p=float_field(body, "top_p", 0.0, 1.0, default=1.0),
        top_k=0,
        min_p=0.0,
        repeat_penalty=1.0,
        # OpenAI's penalties count every token generated so far; -1 makes the window the whole context.
        repeat_last_n=-1,
        presence_penalty=float_field(body, "presence_penalty", -2.0, 2.0, default=0.0),
        frequency_penalty=float_field(body, "frequency_penalty", -2.0, 2.0, default=0.0),
        seed=int_field(body, "seed", INT64_MIN, INT64_MAX),
        stop=_stop_strings(body.get("stop")),
        logit_bias=_logit_bias(body.get("logit_bias")),
    )


MAX_LOGIT_BIASES = 300  # OpenAI's limit


def _logit_bias(value: Any) -> dict[int, float] | None:
    """{"token id": bias in -100..100} -> {id: bias}; the ids are checked against the model's vocabulary later."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(f'field "logit_bias" must be an object of token ids and biases, got {json_type(value)}',
                           field="logit_bias")
    if len(value) > MAX_LOGIT_BIASES:
        raise RequestError(f'field "logit_bias" has {len(value)} tokens; the maximum is {MAX_LOGIT_BIASES}',
                           field="logit_bias")
    biases = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise RequestError(f'field "logit_bias": {key!r} is not a token id', field="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise RequestError(f'field "logit_bias": the bias of token {key} must be a number from -100 to 100',
                               field="logit_bias")
        biases[int(key)] = float(bias)
    return biases


def _stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError('field "stop" must be a non-empty string or a list of them', field="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f'field "stop" has {len(stops)} strings; the maximum is {MAX_STOP_STRINGS}', field="stop")
    return stops


@dataclass(frozen=True)
class StreamOptions:
    stream: bool = False
    include_usage: bool = False  # a last chunk with `usage` and `choices: []`


def parse_stream(body: dict) -> StreamOptions:
    stream = bool(bool_field(body, "stream", False))
    options = body.get("stream_options")
    if options is None:
        return StreamOptions(stream)
    if not isinstance(options, dict):
        raise RequestError(f'field "stream_options" must be an object, got {json_type(options)}',
                           field="stream_options")
    include_usage = bool_field({"stream_options.include_usage": options.get("include_usage")},
                                "stream_options.include_usage", False)
    return StreamOptions(stream, bool(include_usage))


def parse_logprobs(body: dict) -> int | None:
    """None: no logprobs; else how many alternatives (top_logprobs, 0-20) each token reports."""
    wanted = bool_field(body, "logprobs", False)
    top = int_field(body, "top_logprobs", 0, 20)
    if top is not None and not wanted:
        raise RequestError('field "top_logprobs" needs "logprobs": true', field="top_logprobs")
    return (top or 0) if wanted else None


def _token_json(token: bytes, logprob: float) -> dict:
    # A token can be part of a UTF-8 character: `bytes` is exact, `token` the text it reads as.
    return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(token)}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: one entry per generated token."""
    content = [{**_token_json(t.token, t.logprob), "top_logprobs": [_token_json(b, lp) for b, lp in t.top]}
               for t in tokens]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[TokenLogprob], offset: int = 0) -> dict:
    """A /v1/completions choice's `logprobs` (the legacy form); offset: where the first token's text starts."""
    texts = [t.token.decode("utf-8", errors="replace") for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{b.decode("utf-8", errors="replace"): lp for b, lp in t.top} for t in tokens],
            "text_offset": offsets}


# --- POST /v1/chat/completions -----------------------------------------------------------------------


def parse_response_format(value: Any, field: str = "response_format") -> tuple[bool, CompiledSchema | None]:
    """(whether the answer is held to one JSON object, the schema it follows): `json_object` (OpenAI's JSON mode)
    holds it to any object, `json_schema` to one the schema allows; `text` (or none) leaves it free. `field`: what
    the request calls it (the Responses API: `text.format`), for the errors."""
    if value is None:
        return False, None
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str):
        got = "an object without one" if isinstance(value, dict) else json_type(value)
        raise RequestError(f'field "{field}" must be an object with a "type" string, got {got}',
                           field=field)
    if kind in ("text", "json_object"):
        return kind == "json_object", None
    if kind != "json_schema":
        raise RequestError(f'field "{field}" type must be "text", "json_object" or "json_schema", got '
                           f"{kind!r}", field=field)
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise RequestError(f'field "{field}": "json_schema" needs {{"name": ..., "schema": {{...}}}}',
                           field=field)
    try:
        return True, compile_schema(spec["schema"])
    except SchemaError as exc:
        raise RequestError(f'field "{field}": {exc}', field=field) from None


@dataclass(frozen=True)
class ChatRequest:
    messages: list  # OpenAI chat messages; the chat template checks them (InvalidMessages)
    tools: list[dict] | None  # passed to the template; None when none were offered (or tool_choice "none")
    options: Options
    stream: StreamOptions
    logprobs: int | None
    template_kwargs: dict  # chat_template_kwargs (vLLM's extension), e.g. {"enable_thinking": false}
    model: str | None
    json_output: bool = False  # response_format json_object or json_schema: the answer is one JSON object
    json_schema: CompiledSchema | None = None  # response_format json_schema: the schema it follows
    # tool_choice "required" or a named function: the answer is one call of these tools (its JSON follows
    # json_schema: {"name", "arguments"})
    forced_tools: list[dict] | None = None


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError('field "messages" must be a non-empty array of messages', field="messages")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RequestError('field "tools" must be an array of tool objects', field="tools")
    forced_tools = parse_tool_choice(body.get("tool_choice"), tools)
    if body.get("tool_choice") == "none" or not tools:
        tools = None
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise RequestError('field "chat_template_kwargs" must be an object', field="chat_template_kwargs")
    json_output, json_schema = parse_response_format(body.get("response_format"))
    if forced_tools is not None:
        if json_output:
            raise RequestError('fields "tool_choice" and "response_format" both say what the answer is: the first '
                               "asks for a tool call, the second for JSON content; send one", field="tool_choice")
        json_output, json_schema = True, call_schema(forced_tools)
    return ChatRequest(messages=messages, tools=tools, options=parse_sampling(body, limits),
                       stream=parse_stream(body), logprobs=parse_logprobs(body), template_kwargs=template_kwargs,
                       model=str_field(body, "model"), json_output=json_output, json_schema=json_schema,
                       forced_tools=forced_tools)


def parse_tool_choice(value: Any, tools: list[dict] | None) -> list[dict] | None:
    """The tools one of which the answer must call: all of them for "required", the one named for
    {"type": "function", "function": {"name": ...}}; None for "auto", "none" or no tool_choice."""
    if value is None or value in ("auto", "none"):
        return None
    if not tools:
        raise RequestError('field "tool_choice" asks for a tool call, but the request offers no tools',
                           field="tool_choice")
    if value == "required":
        return tools
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or value.get("type") != "function":
        raise RequestError('field "tool_choice" must be "auto", "none", "required" or {"type": "function", '
                           '"function": {"name": ...}}', field="tool_choice")
    named = [tool for tool in tools if _tool_name(tool) == name]
    if not named:
        raise RequestError(f'field "tool_choice" names {name!r}, which is not one of the tools', field="tool_choice")
    return named


def _tool_name(tool: dict) -> str | None:
    function = tool.get("function")
    return function.get("name") if isinstance(function, dict) else None


def call_schema(tools: list[dict]) -> CompiledSchema:
    """What a forced call's JSON may be: {"name": one of the tools', "arguments": ...}. With one tool its arguments
    follow its parameters schema (its $defs lifted to the call's root, where its "#/$defs/..." references then
    point); with several (or one whose schema cannot be held to) any object: the schema cannot tell several objects
    apart by their name (text/json_schema.py)."""
    names = [name for name in map(_tool_name, tools) if isinstance(name, str)]
    if not names:
        raise RequestError('field "tools": no tool has a function name to call', field="tools")

    def call(arguments: Any, definitions: dict) -> dict:
        return {**definitions, "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"enum": names}, "arguments": arguments}}

    parameters = tools[0]["function"].get("parameters") if len(tools) == 1 else None
    if isinstance(parameters, dict) and parameters.get("type", "object") == "object":
        definitions = {key: parameters[key] for key in ("$defs", "definitions") if key in parameters}
        try:
            return compile_schema(call(parameters, definitions))
        except SchemaError:
            pass
    try:
        return compile_schema(call({"type": "object"}, {}))
    except SchemaError as exc:
        raise RequestError(f'field "tools": {exc}', field="tools") from None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, how many came from the prompt cache

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True)
class ChatCompletion:
    """A whole chat answer (no stream)."""

    id: str
    model: str
    message: dict  # role, content, and reasoning_content / tool_calls when there are some
    finish_reason: str  # stop | length | tool_calls
    usage: Usage
    logprobs: dict | None = None
    created: int = field(default_factory=now)

    def to_json(self) -> dict:
        choice = {"index": 0, "message": self.message, "logprobs": self.logprobs, "finish_reason": self.finish_reason}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage.to_json()}


@dataclass(frozen=True)
class ChatChunk:
    """One streamed piece of a chat answer; `delta` empty and `finish_reason` set in the last of the choice's."""

    id: str
    model: str
    created: int
    delta: dict
    finish_reason: str | None = None
    logprobs: dict | None = None

    def to_json(self) -> dict:
        choice = {"index": 0, "delta": self.delta, "logprobs": self.logprobs, "finish_reason": self.finish_reason}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}


@dataclass(frozen=True)
class UsageChunk:
    """stream_options.include_usage: the stream's last chunk, with no choices."""

    id: str
    object: str  # chat.completion.chunk | text_completion
    model: str
    created: int
    usage: Usage

    def to_json(self) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage.to_json()}


# --- POST /v1/completions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextCompletionRequest:
    prompt: str
    options: Options
    stream: StreamOptions
    logprobs: int | None
    model: str | None


def parse_text_completion(body: dict, limits: Limits) -> TextCompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError('field "prompt" must be a string (or a list of one string)', field="prompt")
    logprobs = int_field(body, "logprobs", 0, 5)  # the legacy API: how many alternatives per token
    return TextCompletionRequest(prompt=prompt, options=parse_sampling(body, limits), stream=parse_stream(body),
                                 logprobs=logprobs, model=str_field(body, "model"))


@dataclass(frozen=True)
class TextCompletion:
    """A whole completion, or (stream) one piece of it; `usage` only on a whole one."""

    id: str
    model: str
    created: int
    text: str
    finish_reason: str | None
    usage: Usage | None = None
    logprobs: dict | None = None

    def to_json(self) -> dict:
        choice = {"index": 0, "text": self.text, "logprobs": self.logprobs, "finish_reason": self.finish_reason}
        answer = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                  "choices": [choice]}
        if self.usage is not None:
            answer["usage"] = self.usage.to_json()
        return answer


# --- GET /v1/models --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    id: str
    created: int

    def to_json(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "mlxrunner"}


# --- POST /v1/embeddings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIEmbeddingRequest:
    embedding: EmbeddingRequest  # the inputs, with the model's normalisation and truncation
    encoding_format: str  # float | base64
    dimensions: int | None  # None: all of the model's; else cut and re-normalised (Matryoshka-style)
    model: str | None  # echoed back; the runner serves one model whatever this says


def parse_openai_embedding(body: dict, limits: Limits, model_dims: int) -> OpenAIEmbeddingRequest:
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):  # false, 0, "" and the like included: they are not a format
        raise RequestError(f'field "encoding_format" must be "float" or "base64", got {encoding!r}',
                           field="encoding_format")
    return OpenAIEmbeddingRequest(
        embedding=parse_embedding({"input": body.get("input")}, limits),
        encoding_format=encoding,
        dimensions=int_field(body, "dimensions", 1, model_dims),
        model=str_field(body, "model"),
    )


@dataclass(frozen=True)
class OpenAIEmbeddingResponse:
    embeddings: list[list[float] | str]  # floats, or base64 of little-endian float32
    model: str
    prompt_tokens: int

    def to_json(self) -> dict:
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(self.embeddings)]
        usage = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        return {"object": "list", "data": data, "model": self.model, "usage": usage}


# --- POST /v1/images/generations, /v1/images/edits ----------------------------------------------------------


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    n: int
    width: int | None  # None: the model's default (an edit: the first reference image's size)
    height: int | None
    seed: int | None  # image i uses seed + i; None: each image its own random seed
    steps: int | None
    negative_prompt: str | None
    guidance: float | None
    images: list[bytes] = field(default_factory=list)  # reference images (edits)
    cache_threshold: float | None = None  # the step cache's (an extra field, "cache": {"threshold": x}); None: off
    vae_tile: int | None = None  # the VAE's tile in pixels (an extra field, as on /completion); None: by size
    output_format: str = "png"  # png, jpeg or webp
    output_quality: int = 100  # output_compression: the lossy formats' quality, 0-100


OUTPUT_FORMATS = ("png", "jpeg", "webp")  # gpt-image-1's output_format values

# Form fields arrive as text (the openai client sends `n="2"`): these are converted before parse_image_request.
_INT_FORM_FIELDS = ("n", "seed", "steps", "vae_tile", "output_compression")
_FLOAT_FORM_FIELDS = ("guidance_scale",)


def form_fields_as_json(fields: dict[str, str]) -> dict:
    """multipart/form-data text fields -> the values a JSON body would hold."""
    body: dict[str, Any] = dict(fields)
    # An object field arrives flattened as the openai client writes it: "cache[threshold]" -> {"cache": {...}}.
    for name in [n for n in body if n.startswith("cache[") and n.endswith("]")]:
        body.setdefault("cache", {})[name[len("cache["):-1]] = body.pop(name)
    if isinstance(body.get("cache"), dict) and "threshold" in body["cache"]:
        body["cache"]["threshold"] = _form_number(body["cache"]["threshold"], "cache.threshold", float)
    for name, convert in [(n, int) for n in _INT_FORM_FIELDS] + [(n, float) for n in _FLOAT_FORM_FIELDS]:
        if name in body:
            body[name] = _form_number(body[name], name, convert)
    return body


def _form_number(text: str, name: str, convert: type) -> int | float:
    try:
        return convert(text)
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise RequestError(f'field "{name}" must be {kind}, got {text!r}', field=name) from None


def parse_image_request(body: dict, limits: Limits, images: list[bytes] = ()) -> ImageRequest:
    prompt = str_field(body, "prompt")
    if not prompt:
        raise RequestError('field "prompt" is required', field="prompt")
    response_format = str_field(body, "response_format", "b64_json")
    if response_format != "b64_json":
        raise RequestError(f'field "response_format" must be "b64_json", got {response_format!r}: this runner has '
                           "no file server to give URLs from", field="response_format")
    width, height = _parse_size(str_field(body, "size"), limits)
    output_format, output_quality = _parse_output_format(body)
    return ImageRequest(
        prompt=prompt,
        n=int_field(body, "n", 1, MAX_IMAGES_PER_REQUEST, default=1),
        width=width,
        height=height,
        seed=int_field(body, "seed", INT64_MIN, INT64_MAX),
        steps=int_field(body, "steps", 1, limits.max_steps),
        negative_prompt=str_field(body, "negative_prompt"),
        guidance=float_field(body, "guidance_scale", 0.0, 100.0),
        images=list(images),
        cache_threshold=parse_cache(body.get("cache"), limits),
        vae_tile=parse_vae_tile(body, limits),
        output_format=output_format,
        output_quality=output_quality,
    )


def _parse_output_format(body: dict) -> tuple[str, int]:
    """gpt-image-1's `output_format` (png, jpeg, webp), `output_compression` (0-100, the lossy formats'
    quality here, as other OpenAI-compatible servers read it) and `background` (the images have no alpha:
    "transparent" is refused)."""
    output_format = str_field(body, "output_format", "png")
    if output_format not in OUTPUT_FORMATS:
        raise RequestError(f'field "output_format" must be one of {", ".join(OUTPUT_FORMATS)}, got {output_format!r}',
                           field="output_format")
    quality = int_field(body, "output_compression", 0, 100, default=100)
    if body.get("output_compression") is not None and output_format == "png":
        raise RequestError('field "output_compression" applies to "jpeg" and "webp" output only',
                           field="output_compression")
    background = str_field(body, "background", "auto")
    if background not in ("auto", "opaque"):
        raise RequestError(f'field "background" must be "auto" or "opaque", got {background!r}: the images have no '
                           "alpha channel", field="background")
    return output_format, quality


def _parse_size(size: str | None, limits: Limits) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    try:
        width, height = (int(side) for side in size.lower().split("x"))
    except ValueError:
        raise RequestError(f'field "size" must be "WIDTHxHEIGHT" (e.g. "1024x1024") or "auto", got {size!r}',
                           field="size") from None
    if width < 1 or height < 1 or width * height > limits.max_output_pixels:
        raise RequestError(f'field "size" {size} must have positive sides and at most {limits.max_output_pixels} '
                           "pixels", field="size")
    return width, height


@dataclass(frozen=True)
class ImagesResponse:
    images: list[str]  # base64, in output_format
    output_format: str = "png"
    created: int = field(default_factory=now)

    def to_json(self) -> dict:
        return {"created": self.created, "data": [{"b64_json": image} for image in self.images],
                "output_format": self.output_format}
