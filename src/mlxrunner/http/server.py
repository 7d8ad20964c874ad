"""The HTTP server (aiohttp): the app, /health, errors -> responses, and running a route's job.

Handlers never touch MLX: they validate the request (protocol.py), submit a job to the worker
thread (worker.py) and await it. Each wire protocol's routes live in its own module (ollama.py,
openai.py) and are registered here; which routes each mode serves is declared here only
(ROUTES_BY_MODE). The port opens before the model has loaded, so /health can report load
progress; /health never waits for a job. A client that goes away cancels its job, queued or
running (aiohttp cancels the handler; the handler cancels the job).

Whose fault an error is decides its status, in one place (`describe_error`): a RequestError, or a
model's typed input error, is the client's (4xx, or 503 for "try again later"); Cancelled is 503;
a ModelError is 500; anything else is an internal error: 500 and a log line naming the route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar

from aiohttp import web

from mlxrunner.detect import Mode
from mlxrunner.errors import Cancelled, ModelError, RequestError
from mlxrunner.http import ollama, openai
from mlxrunner.http.off_loop import OffLoop
from mlxrunner.http.protocol import (
    EmbeddingRequest,
    HealthFailed,
    HealthLoading,
    HealthReady,
    Limits,
    Message,
    StreamError,
    ndjson_line,
    parse_json_body,
)
from mlxrunner.models import Embedder, LoadedModel
from mlxrunner.settings import DEFAULT_MAX_BODY_MB, DEFAULT_READ_TIMEOUT_S, MIB
from mlxrunner.worker import Job, JobContext, QueueFull, Worker, WorkerStopped

if TYPE_CHECKING:
    from mlxrunner.embed.bert import EmbeddingResult

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The wire protocols: each module's routes(server) gives its POST routes, error_json(error) its error body.
PROTOCOLS = (ollama, openai)

# What each mode serves, so a request to a route the loaded model cannot answer is a clear 409.
ROUTES_BY_MODE = {
    Mode.EMBEDDING: {"/embedding", "/v1/embeddings", "/tokenize", "/detokenize"},
    Mode.LLM: {"/completion", "/embedding", "/v1/embeddings", "/tokenize", "/detokenize"},
    Mode.IMAGEGEN: {"/completion"},
}


@dataclass
class RunnerState:
    """What /health reports, and the loaded model once there is one."""

    model_name: str
    status: str = "loading"  # loading | ok | error
    progress: float = 0.0
    error: str | None = None
    loaded: LoadedModel | None = None
    shutting_down: bool = False
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class HttpError:
    """An error as the client sees it; each protocol module turns it into its own error body."""

    status: int
    message: str
    field: str | None = None  # the request field at fault, if one is


def memory_in_use() -> dict[str, int]:
    """MLX's allocator, in bytes: arrays alive (weights, a job's activations), buffers kept for reuse
    (given back once the runner is idle, see Worker), and the peak of arrays alive since start."""
    import mlx.core as mx

    return {"active_bytes": mx.get_active_memory(), "cache_bytes": mx.get_cache_memory(),
            "peak_bytes": mx.get_peak_memory()}


def client_error(error: BaseException) -> RequestError | None:
    """The error as a RequestError if the client caused it, else None.

    The models raise their own typed errors for what a client can get wrong; this is the one place
    they become client errors. (Imported here, not at the top: each pulls in its model's package.)
    """
    from mlxrunner.embed.bert import InputTooLong
    from mlxrunner.imagegen.images import BadImage
    from mlxrunner.llm.model import PromptTooLong

    if isinstance(error, RequestError):
        return error
    if isinstance(error, PromptTooLong):
        return RequestError(f'field "prompt": {error}', field="prompt")
    if isinstance(error, InputTooLong):
        return RequestError(str(error), field="input")
    if isinstance(error, BadImage):
        return RequestError(str(error), field="images")
    return None


def describe_error(error: BaseException, request: web.Request) -> HttpError:
    """The status and message of an error raised while serving `request`; internal errors are logged."""
    as_client_error = client_error(error)
    if as_client_error is not None:
        return HttpError(as_client_error.status, str(as_client_error), as_client_error.field)
    if isinstance(error, Cancelled):
        return HttpError(503, f"request cancelled: {error}")
    if isinstance(error, ModelError):
        log.error("%s %s: the model failed: %s", request.method, request.path, error)
        return HttpError(500, str(error))
    log.error("internal error in %s %s: %s: %s", request.method, request.path, type(error).__name__, error,
              exc_info=error)
    return HttpError(500, f"internal error: {type(error).__name__}: {error}")


class Server:
    def __init__(self, state: RunnerState, worker: Worker, limits: Limits = Limits(),
                 max_body_bytes: int = DEFAULT_MAX_BODY_MB * MIB, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
        self.state = state
        self.worker = worker
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.off_loop = OffLoop()  # tokenizing: neither on the event loop nor on the MLX worker
        self._error_json: dict[str, Callable[[HttpError], dict]] = {}  # route -> its protocol's error body
        self._stopping: asyncio.Event | None = None  # made on the event loop, in app()

    def begin_shutdown(self) -> None:
        """Refuse new requests and answer the in-flight ones now, without waiting for their jobs.

        A job stops at its next step, which may be seconds away on a slow CPU; the parent allows
        5 s from SIGINT to SIGKILL, so handlers answer at once and the job unwinds on its own.
        """
        self.state.shutting_down = True
        if self._stopping is not None:
            self._stopping.set()

    # --- app --------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors_as_responses])
        app.router.add_route("*", "/health", self.health)
        for protocol in PROTOCOLS:
            for path, handler in protocol.routes(self).items():
                app.router.add_post(path, handler)  # other methods: 405, from aiohttp
                self._error_json[path] = protocol.error_json
        return app

    @web.middleware
    async def _errors_as_responses(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return self._error_response(request, self._describe_http_exception(request, exc), exc.headers.get("Allow"))
        except ConnectionResetError:  # the client has gone: there is no one to answer
            raise
        except Exception as exc:  # noqa: BLE001 - every error is answered; describe_error logs the internal ones
            return self._error_response(request, describe_error(exc, request))

    def _describe_http_exception(self, request: web.Request, exc: web.HTTPException) -> HttpError:
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return HttpError(413, f"request body is larger than the limit of {self.max_body_bytes} bytes")
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = " or ".join(sorted(exc.allowed_methods))
            return HttpError(405, f"method {request.method} not allowed on {request.path}; use {allowed}")
        return HttpError(exc.status, f"{exc.reason}: {request.method} {request.path}")

    def _error_response(self, request: web.Request, error: HttpError, allow: str | None = None) -> web.Response:
        error_json = self._error_json.get(request.path, ollama.error_json)  # unknown paths: the runner's own form
        headers = {"Allow": allow} if allow else None
        return web.json_response(error_json(error), status=error.status, headers=headers)

    # --- what the routes share --------------------------------------------------------------------

    async def read_json(self, request: web.Request) -> dict:
        try:
            raw = await asyncio.wait_for(request.read(), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"request body did not arrive within {self.read_timeout_s:g} s", status=408) from None
        return parse_json_body(raw)

    def model_for(self, request: web.Request) -> LoadedModel:
        """The loaded model if it serves this route, else an error saying why not."""
        state = self.state
        if state.shutting_down:
            raise RequestError("the runner is shutting down", status=503)
        if state.status == "loading":
            raise RequestError(f"the model is still loading ({state.progress:.0%}); poll /health", status=503)
        if state.status == "error" or state.loaded is None:
            raise ModelError(f"the model failed to load: {state.error}")
        loaded = state.loaded
        if request.path not in ROUTES_BY_MODE[loaded.mode]:
            serves = ", ".join(sorted(ROUTES_BY_MODE[loaded.mode]))
            raise RequestError(
                f"{request.path} is not served by this runner: it has loaded a {loaded.mode.value} model "
                f"({loaded.name}), which serves {serves}", status=409)
        return loaded

    def _submit(self, name: str, fn: Callable[[JobContext], T]) -> Job:
        try:
            return self.worker.submit(name, fn)
        except (QueueFull, WorkerStopped) as exc:
            raise RequestError(str(exc), status=503) from None

    async def run(self, name: str, fn: Callable[[JobContext], T]) -> T:
        """Run `fn(ctx)` on the worker and return its result (or raise its error); cancel it if the client
        goes away."""
        job = self._submit(name, fn)
        done = asyncio.ensure_future(job.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([done, stopping], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel("client disconnected")
            done.cancel()
            raise
        finally:
            stopping.cancel()
        if not done.done():
            job.cancel("the runner is shutting down")
            done.cancel()
            raise RequestError("request cancelled: the runner is shutting down", status=503)
        return done.result()

    async def embed(self, model: Embedder, req: EmbeddingRequest) -> EmbeddingResult:
        """An embedding job: the same whichever wire protocol the request came in on."""
        return await self.run("embedding", lambda ctx: model.embed(req.inputs, req.normalize, req.truncate,
                                                                   ctx.check_cancelled))

    async def stream(self, request: web.Request, name: str, fn: Callable[[JobContext], Message]) -> web.StreamResponse:
        """Run a job whose events (wire messages) become NDJSON lines; its result is the final line.

        Headers go out with the first line, so a job that fails before producing anything (a
        prompt too long, say) still gets a proper HTTP error status. After that, an error is a
        final `{"error": ..., "done": true}` line.
        """
        job = self._submit(name, fn)
        response: web.StreamResponse | None = None

        async def send(message: Message) -> None:
            nonlocal response
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
            await response.write(ndjson_line(message.to_json()))

        events = job.events().__aiter__()
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                next_event = asyncio.ensure_future(events.__anext__())
                await asyncio.wait([next_event, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not next_event.done():
                    next_event.cancel()
                    job.cancel("the runner is shutting down")
                    if response is None:  # nothing sent yet: a status the client can act on, not a 200
                        raise RequestError("request cancelled: the runner is shutting down", status=503)
                    await send(StreamError("the runner is shutting down"))
                    return response
                try:
                    await send(next_event.result())
                except StopAsyncIteration:
                    break
        except (asyncio.CancelledError, ConnectionResetError):
            job.cancel("client disconnected")
            raise
        finally:
            stopping.cancel()
        if job.error is None:
            await send(job.result)
        elif response is None:
            raise job.error
        elif isinstance(job.error, Cancelled):  # the client knows what it asked for; the line says why it stopped
            await send(StreamError(str(job.error) or "cancelled"))
        else:
            await send(StreamError(describe_error(job.error, request).message))
        return response

    # --- /health ----------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        state = self.state
        if state.status == "ok" and state.loaded is not None:
            ready = HealthReady(state.loaded.mode.value, state.model_name, memory_in_use())
            return web.json_response(ready.to_json())
        if state.status == "error":
            return web.json_response(HealthFailed(state.error or "").to_json(), status=500)
        return web.json_response(HealthLoading(state.progress).to_json(), status=503)
