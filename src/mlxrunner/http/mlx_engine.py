"""Ollama's current LLM runner protocol, served under `--mlx-engine`.

Ollama's parent (x/mlxrunner's Client) launches `ollama runner --mlx-engine --model M --port P`, polls
GET /v1/status until it answers 200, and POSTs `{"Prompt","Options","Logprobs","TopLogprobs"}` to
/completion (its own runner redirects that to /v1/completions with a 308; we serve both paths).
Field names are Go's struct names, with no JSON tags: Go decodes them case-insensitively, so
`prompt` works as well as `Prompt`. Options are Go's `api.Options`: what the parent leaves out is
Go's zero value, which for sampling means greedy, no penalties and seed 0 (seeded).

The stream is `application/jsonl`: every line has every field. Errors before the stream are
text/plain, as Go's `http.Error` writes them; an error after it has begun is one line whose `Error`
is Go's `api.StatusError`. The contract, and where we differ from Ollama, is docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mlxrunner.detect import Mode
from mlxrunner.errors import RequestError
from mlxrunner.http.ollama import plain_text_error
from mlxrunner.request import Limits, Options, bool_field, int_field, json_type, parse_options, str_field

if TYPE_CHECKING:
    from mlxrunner.http.server import HttpError, Server
    from mlxrunner.llm.answer import Completion, TokenLogprob
    from mlxrunner.models import TextModel
    from mlxrunner.worker import JobContext

COMPLETION_PATHS = ("/v1/completions", "/completion")  # today's parent POSTs to the second
ROUTES_BY_MODE = {Mode.LLM: {*COMPLETION_PATHS, "/v1/tokenize"}}

# llm.DoneReason in Ollama's Go code.
DONE_REASONS = {"stop": 0, "length": 1}
INT32_MAX = 2**31 - 1
MAX_TOP_LOGPROBS = 20

# The request's top-level fields, as Go's decoder matches them (case-insensitively), plus the
# snake_case spelling of TopLogprobs that OpenAI-minded clients send.
REQUEST_FIELDS = {"prompt": "prompt", "options": "options", "logprobs": "logprobs", "toplogprobs": "top_logprobs",
                  "top_logprobs": "top_logprobs"}


def register(app: web.Application, server: Server) -> None:
    handlers = MlxEngineRoutes(server)
    app.router.add_get("/v1/status", handlers.status)
    app.router.add_get("/health", handlers.status)  # Ollama's runner redirects it to /v1/status
    app.router.add_route("*", "/v1/models", handlers.models)
    for path in COMPLETION_PATHS:
        app.router.add_post(path, handlers.completion)
    app.router.add_post("/v1/tokenize", handlers.tokenize)


def error_response(request: web.Request, error: HttpError) -> web.Response:
    return plain_text_error(error)


# --- the wire types -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRequest:
    prompt: str
    options: Options
    logprobs: bool
    top_logprobs: int


@dataclass(frozen=True)
class EngineLine:
    """One line of the stream (Go's CompletionResponse): a text chunk, the final line, or an error."""

    content: str = ""
    done: bool = False
    done_reason: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0
    eval_duration: int = 0  # ns
    error: HttpError | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens that made `content`, when the request asked

    def to_json(self) -> dict:
        error = None
        if self.error is not None:  # Go's api.StatusError
            error = {"StatusCode": self.error.status, "Status": "", "error": self.error.message}
        return {"Content": self.content, "Done": self.done, "DoneReason": self.done_reason,
                "PromptEvalCount": self.prompt_eval_count, "PromptEvalDuration": self.prompt_eval_duration,
                "EvalCount": self.eval_count, "EvalDuration": self.eval_duration,
                "Logprobs": None if self.logprobs is None else [go_logprob(t) for t in self.logprobs],
                "Error": error}


def go_logprob(token: TokenLogprob) -> dict:
    """Ollama's Logprob: {"token", "logprob", "top_logprobs"} (the last left out when empty, as Go's omitempty)."""
    out = {"token": token.token.decode("utf-8", "replace"), "logprob": token.logprob}
    if token.top:
        out["top_logprobs"] = [{"token": t.decode("utf-8", "replace"), "logprob": lp} for t, lp in token.top]
    return out


def final_line(completion: Completion) -> EngineLine:
    return EngineLine(done=True, done_reason=DONE_REASONS.get(completion.done_reason, DONE_REASONS["length"]),
                      prompt_eval_count=completion.prompt_eval_count,
                      prompt_eval_duration=completion.prompt_eval_duration, eval_count=completion.eval_count,
                      eval_duration=completion.eval_duration)


def error_line(error: HttpError) -> EngineLine:
    return EngineLine(error=error)


def go_json(obj: Any, status: int = 200) -> web.Response:
    """JSON as Go's json.Encoder writes it: compact, newline-terminated."""
    return web.Response(body=json.dumps(obj, separators=(",", ":")).encode() + b"\n", status=status,
                        content_type="application/json")


# --- parsing ---------------------------------------------------------------------------------------


def parse_request(body: dict, limits: Limits) -> EngineRequest:
    # Errors name the fields as Ollama's Go struct does.
    given = {REQUEST_FIELDS[key.lower()]: value for key, value in body.items() if key.lower() in REQUEST_FIELDS}
    named = {"Prompt": given.get("prompt"), "Logprobs": given.get("logprobs"), "TopLogprobs": given.get("top_logprobs")}
    return EngineRequest(
        prompt=str_field(named, "Prompt", ""),  # Go's zero value; refused as "empty prompt" once tokenized
        options=parse_go_options(given.get("options"), limits),
        logprobs=bool_field(named, "Logprobs", False),
        top_logprobs=int_field(named, "TopLogprobs", 0, INT32_MAX, 0),
    )


# Go's zero values of api.Options' sampling fields, as the runner reads them when the parent leaves one
# out: greedy, no top-k/top-p/min-p, penalties off (repeat_last_n 0), seed 0 = seeded.
GO_ZERO_OPTIONS = {"temperature": 0.0, "top_k": 0, "top_p": 0.0, "min_p": 0.0, "repeat_penalty": 0.0,
                   "repeat_last_n": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": 0}


def parse_go_options(value: Any, limits: Limits) -> Options:
    """api.Options with Ollama's runner semantics, as sampling options."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RequestError(f'field "Options" must be an object, got {json_type(value)}', field="Options")
    raw = {key.lower(): item for key, item in value.items()}  # Go's tags match case-insensitively too
    options = parse_options(with_go_meanings(raw), limits)
    return replace(options, **{name: zero for name, zero in GO_ZERO_OPTIONS.items()
                               if getattr(options, name) is None})


def with_go_meanings(raw: dict) -> dict:
    """Values Ollama's runner accepts outside our ranges, mapped to the in-range value that means the same."""

    def number(name: str) -> float | None:
        item = raw.get(name)
        return item if isinstance(item, (int, float)) and not isinstance(item, bool) else None

    meanings: dict[str, Callable[[float], Any]] = {
        "num_predict": lambda v: None if v <= 0 else v,  # <= 0: until the context is full
        "temperature": lambda v: max(v, 0.0),  # negative: a one-hot distribution, i.e. greedy
        "top_k": lambda v: max(v, 0),  # <= 0: off
        "top_p": lambda v: 0.0 if v <= 0 or v >= 1 else v,  # only 0 < p < 1 filters
        "min_p": lambda v: 0.0 if v <= 0 or v > 1 else v,  # only 0 < m <= 1 filters
        "repeat_penalty": lambda v: max(v, 0.0),  # <= 0: 1, no penalty
        "repeat_last_n": lambda v: max(v, -1),  # negative: the whole context
    }
    mapped = dict(raw)
    for name, meaning in meanings.items():
        v = number(name)
        if v is not None:
            mapped[name] = meaning(v)
    return mapped


def check_prompt_fits(tokens: list[int], context_length: int) -> None:
    """Ollama's checks, with its messages, before the request is queued."""
    if not tokens:
        raise RequestError("empty prompt", field="Prompt")
    if len(tokens) >= context_length:
        raise RequestError(f"input length ({len(tokens)} tokens) exceeds the model's maximum context length "
                           f"({context_length} tokens)", field="Prompt")


# --- the routes ------------------------------------------------------------------------------------


class MlxEngineRoutes:
    def __init__(self, server: Server):
        self.server = server

    async def status(self, request: web.Request) -> web.Response:
        """200 once the model is ready (the parent polls until then); 503 loading, 500 failed, as text."""
        state = self.server.state
        if state.status == "ok" and state.loaded is not None:
            model: TextModel = state.loaded.text_model
            return go_json({"Status": 0, "Progress": 100, "ContextLength": model.context_length,
                            "Memory": memory_bytes()})
        if state.status == "error":
            return web.Response(text=f"the model failed to load: {state.error}\n", status=500)
        return web.Response(text=f"loading model ({state.reported_progress():.0%})\n", status=503)

    async def models(self, request: web.Request) -> web.Response:
        if request.method in ("GET", "POST"):
            return go_json({"Success": True})
        return web.Response(content_type="application/json")  # DELETE and the rest: Ollama's runner writes nothing

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.read_json(request)
        model = self.server.model_for(request).text_model
        req = parse_request(body, self.server.limits)
        # Tokenizing is not MLX work: it runs beside a generation, as Ollama's does, so a bad prompt is
        # refused at once even while the worker is busy.
        tokens = await asyncio.to_thread(model.encode_prompt, req.prompt)
        check_prompt_fits(tokens, model.context_length)
        job = generation_job(model, tokens, req.options, top_logprobs(req))
        return await self.server.stream(request, "completion", job,
                                        content_type="application/jsonl", error_line=error_line,
                                        finish_on_shutdown=True)

    async def tokenize(self, request: web.Request) -> web.Response:
        """The raw body is the text (the parent sends text/plain); the answer a bare array of ids."""
        text = (await request.read()).decode("utf-8", "replace")
        model = self.server.model_for(request).text_model
        return go_json(await asyncio.to_thread(model.encode_prompt, text))


def top_logprobs(req: EngineRequest) -> int | None:
    """None: no logprobs; k >= 0: each token's log-probability with its k best alternatives (Ollama: Logprobs
    asks for them, TopLogprobs says how many alternatives; at most 20, as OpenAI's API)."""
    return min(req.top_logprobs, MAX_TOP_LOGPROBS) if req.logprobs else None


def generation_job(model: TextModel, tokens: list[int], options: Options,
                   top_logprobs: int | None = None) -> Callable[[JobContext], EngineLine]:
    """The worker job: a line per text chunk (never an empty one), then the final line."""

    # Imported here, not at the top: the server module must not load MLX before cli/ checks the backend.
    from mlxrunner.llm.answer import TokenLogprob

    def generate(ctx: JobContext) -> EngineLine:
        completion = None
        pending: list[TokenLogprob] = []  # the tokens since the last chunk: they make its text
        for item in model.stream(tokens, options, ctx.check_cancelled, top_logprobs=top_logprobs):
            if isinstance(item, TokenLogprob):
                pending.append(item)
            elif isinstance(item, str):
                ctx.emit(EngineLine(content=item, logprobs=pending if top_logprobs is not None else None))
                pending = []
            else:
                completion = item
        return final_line(completion)

    return generate


def memory_bytes() -> int:
    """What Ollama's runner reports as Memory: MLX's active plus cached bytes."""
    import mlx.core as mx

    return mx.get_active_memory() + mx.get_cache_memory()
