"""How the OpenAI routes answer: the loaded model or a 400 naming the route to use, errors in OpenAI's shape,
and server-sent event streams.

Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (error_json). A route that does
not fit the loaded model is a 400 naming the route to use: the `openai` client retries 409 and 5xx, and
asking again cannot help. For the same reason a 500 says `x-should-retry: false`: the runner's failures do not
go away on their own; a 503 (loading, queue full) says `Retry-After: 1`. The contract is docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Callable

from aiohttp import web

from mlxrunner.detect import Mode
from mlxrunner.errors import RequestError
from mlxrunner.http.openai_types import OpenAIError
from mlxrunner.http.server import HttpError, Server, describe_error
from mlxrunner.models import LoadedModel
from mlxrunner.worker import JobContext

if TYPE_CHECKING:
    from mlxrunner.http.protocol import Message

# The OpenAI routes each mode answers, so a request on the wrong one can say where to go.
ROUTES_FOR_MODE = {
    Mode.LLM: "/v1/chat/completions, /v1/responses, /v1/completions or /v1/embeddings",
    Mode.EMBEDDING: "/v1/embeddings",
    Mode.IMAGEGEN: "/v1/images/generations (or /v1/images/edits for a model that edits)",
}


def error_json(error: HttpError) -> dict:
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return OpenAIError(error.message, kind, param=error.field).to_json()


def error_headers(error: HttpError) -> dict[str, str]:
    if error.status == 500:
        return {"x-should-retry": "false"}
    if error.status == 503:  # loading, or the queue is full: the client's retries (two, by default) wait this long
        return {"Retry-After": "1"}
    return {}


def loaded_model(server: Server, request: web.Request) -> LoadedModel:
    """The loaded model if it serves this route; a 400 naming the right route if it is of another kind."""
    loaded = server.state.loaded
    if loaded is not None and not server.serves(loaded.mode, request.path):
        raise RequestError(f"{request.path} does not serve this runner's model: {loaded.name} is a "
                           f"{loaded.mode.value} model; use {ROUTES_FOR_MODE[loaded.mode]}")
    return server.model_for(request)


def sse_event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def stream_events(server: Server, request: web.Request, name: str,
                        fn: Callable[[JobContext], list[Message]], *, frame: Callable[[dict], bytes] = sse_event,
                        done: bytes | None = b"data: [DONE]\n\n",
                        error_events: Callable[[HttpError], list[dict]] = lambda error: [error_json(error)],
                        ) -> web.StreamResponse:
    """Run a job whose events (Messages) become server-sent events; its result is the last ones.

    As in Server.stream, headers go with the first event, so a job that fails before producing anything
    (a prompt too long) gets a proper HTTP error. After that an error is `error_events` (chat and completions: one
    `data: {"error": {...}}` event, which the openai client raises as APIError). A good stream ends with `done`
    (chat and completions: `data: [DONE]`; the Responses API sends none). `frame` writes an event as SSE.
    """
    job = server.submit(name, fn)
    response: web.StreamResponse | None = None

    async def send(data: bytes) -> None:
        nonlocal response
        if response is None:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
        await response.write(data)

    try:
        async for message in job.events():
            await send(frame(message.to_json()))
    except (asyncio.CancelledError, ConnectionResetError):
        job.cancel("client disconnected")
        raise
    if job.error is None:
        for message in job.result:
            await send(frame(message.to_json()))
        if done:
            await send(done)
    elif response is None:
        raise job.error
    else:
        for event in error_events(describe_error(job.error, request)):
            await send(frame(event))
    return response
