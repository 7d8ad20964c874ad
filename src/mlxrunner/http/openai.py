"""OpenAI-compatible routes: which there are, the model list, embeddings, errors and server-sent events.

Chat and completions live in openai_chat.py, images in openai_images.py; the wire types in openai_types.py.
Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (error_json). A route that does
not fit the loaded model is a 400 naming the route to use: the `openai` client retries 409 and 5xx, and
asking again cannot help. For the same reason a 500 says `x-should-retry: false`: the runner's failures do not
go away on their own; a 503 (loading, queue full) says `Retry-After: 1`. The contract is docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
from aiohttp import web

from mlxrunner.detect import Mode
from mlxrunner.errors import RequestError
from mlxrunner.http.openai_types import ModelCard, OpenAIEmbeddingResponse, OpenAIError, parse_openai_embedding
from mlxrunner.models import LoadedModel
from mlxrunner.worker import JobContext

if TYPE_CHECKING:
    from mlxrunner.http.protocol import Message
    from mlxrunner.http.server import Handler, HttpError, Server

# The OpenAI routes each mode answers, so a request on the wrong one can say where to go.
ROUTES_FOR_MODE = {
    Mode.LLM: "/v1/chat/completions, /v1/completions or /v1/embeddings",
    Mode.EMBEDDING: "/v1/embeddings",
    Mode.IMAGEGEN: "/v1/images/generations (or /v1/images/edits for a model that edits)",
}


def routes(server: Server) -> dict[str, Handler]:
    """The POST routes."""
    from mlxrunner.http.openai_chat import ChatRoutes
    from mlxrunner.http.openai_images import ImageRoutes

    chat, images, own = ChatRoutes(server), ImageRoutes(server), OpenAIRoutes(server)
    return {"/v1/embeddings": own.embeddings, "/v1/chat/completions": chat.chat_completions,
            "/v1/completions": chat.completions, "/v1/images/generations": images.generations,
            "/v1/images/edits": images.edits}


def get_routes(server: Server) -> dict[str, Handler]:
    handlers = OpenAIRoutes(server)
    # `.+`: the openai client sends a "/" in an id as %2F, which aiohttp has decoded by the time it routes.
    return {"/v1/models": handlers.list_models, "/v1/models/{model_id:.+}": handlers.retrieve_model}


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
                        fn: Callable[[JobContext], list[Message]]) -> web.StreamResponse:
    """Run a job whose events (Messages) become server-sent events; its result is the last ones.

    As in Server.stream, headers go with the first event, so a job that fails before producing anything
    (a prompt too long) gets a proper HTTP error. After that an error is one `data: {"error": {...}}` event,
    which the openai client raises as APIError. A good stream ends with `data: [DONE]`.
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
            await send(sse_event(message.to_json()))
    except (asyncio.CancelledError, ConnectionResetError):
        job.cancel("client disconnected")
        raise
    if job.error is None:
        for message in job.result:
            await send(sse_event(message.to_json()))
        await send(b"data: [DONE]\n\n")
    elif response is None:
        raise job.error
    else:
        from mlxrunner.http.server import describe_error

        await send(sse_event(error_json(describe_error(job.error, request))))
    return response


class OpenAIRoutes:
    def __init__(self, server: Server):
        self.server = server
        # The model's `created`: when this runner started, as a Unix time.
        self.created = int(time.time() - (time.monotonic() - server.state.started))

    def _card(self) -> ModelCard:
        return ModelCard(self.server.state.model_name, self.created)

    async def list_models(self, request: web.Request) -> web.Response:
        """The one model this runner serves, by the name it was started with (loaded or still loading)."""
        return web.json_response({"object": "list", "data": [self._card().to_json()]})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id != self.server.state.model_name:
            raise RequestError(f"model {model_id!r} not found: this runner serves {self.server.state.model_name!r}",
                               status=404, field="model")
        return web.json_response(self._card().to_json())

    async def embeddings(self, request: web.Request) -> web.Response:
        """input, encoding_format (float | base64), dimensions; `model` is echoed back."""
        body = await self.server.read_json(request)
        loaded = loaded_model(self.server, request)
        model = loaded.embedder
        req = parse_openai_embedding(body, self.server.limits, model.dims)
        result = await self.server.embed(model, req.embedding)
        vectors = result.vectors
        if req.dimensions is not None:  # Matryoshka-style: cut, then re-normalise as OpenAI does
            vectors = vectors[:, :req.dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if req.encoding_format == "base64":
            embeddings = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            embeddings = [v.tolist() for v in vectors]
        response = OpenAIEmbeddingResponse(embeddings, req.model or loaded.name, result.token_count)
        return web.json_response(response.to_json())
