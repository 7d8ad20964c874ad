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
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar

from aiohttp import web

from mlxrunner.detect import Mode
from mlxrunner.errors import Cancelled, ModelError, RequestError
from mlxrunner.http import mlx_engine, ollama, openai, ui
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
from mlxrunner.worker import Batch, Job, JobContext, QueueFull, Worker, WorkerStopped

if TYPE_CHECKING:
    from mlxrunner.backend import Backend
    from mlxrunner.embed.bert import EmbeddingResult

log = logging.getLogger(__name__)

T = TypeVar("T")
# Of the 5 s Ollama's parent waits from SIGINT to SIGKILL: how long a running job may still finish for a
# client that asked for that (Ollama's parents); the rest is for unwinding and exiting.
SHUTDOWN_GRACE_SECONDS = 3.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorResponder = Callable[[web.Request, "HttpError"], web.Response]


# Our protocols: each module's routes(server) gives its POST routes, paired with how it answers errors.
# Under --mlx-engine, mlx_engine.register(app, server) replaces them all (Ollama's LLM runner protocol).
def openai_error_response(request: web.Request, error: HttpError) -> web.Response:
    """OpenAI's error body, with the headers its clients read (retry or not, and when)."""
    return web.json_response(openai.error_json(error), status=error.status, headers=openai.error_headers(error))


PROTOCOLS = ((ollama.routes, ollama.error_response), (openai.routes, openai_error_response))

# What each mode serves, so a request to a route the loaded model cannot answer is a clear 409.
ROUTES_BY_MODE = {
    Mode.EMBEDDING: {"/embedding", "/v1/embeddings", "/tokenize", "/detokenize"},
    Mode.LLM: {"/completion", "/embedding", "/v1/embeddings", "/tokenize", "/detokenize", "/v1/chat/completions",
               "/v1/completions"},
    Mode.IMAGEGEN: {"/completion", "/v1/images/generations", "/v1/images/edits"},
}


MOST_PROGRESS_WHILE_LOADING = 0.99


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
    backend: Backend | None = None  # where MLX computes, for /health

    def reported_progress(self) -> float:
        """The load's progress as /health says it. The load's last report (1.0) comes from the worker a moment
        before the event loop marks the runner ready: until then the answer is "loading", below 1."""
        return self.progress if self.status == "ok" else min(self.progress, MOST_PROGRESS_WHILE_LOADING)


@dataclass(frozen=True)
class HttpError:
    """An error as the client sees it; each protocol module turns it into its own error body."""

    status: int
    message: str
    field: str | None = None  # the request field at fault, if one is


# The jobs of the routes that generate text ("completion" is an image too when an image model is loaded).
TEXT_GENERATION_JOBS = frozenset({"completion", "chat"})


def memory_in_use() -> dict[str, int]:
    """MLX's allocator, in bytes: arrays alive (weights, a job's activations), buffers kept for reuse
    (given back once the runner is idle, see Worker), and the peak of arrays alive since start."""
    import mlx.core as mx

    from mlxrunner import backend

    return {"active_bytes": mx.get_active_memory(), "cache_bytes": mx.get_cache_memory(),
            "peak_bytes": backend.peak_memory()}


def backend_json(backend: Backend | None) -> dict | None:
    if backend is None:
        return None
    return {"name": backend.name, "device": backend.device, "memory_bytes": backend.memory_bytes}


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
                 max_body_bytes: int = DEFAULT_MAX_BODY_MB * MIB, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 speaks_mlx_engine: bool = False, serves_ui: bool = True):
        self.state = state
        self.worker = worker
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.speaks_mlx_engine = speaks_mlx_engine  # Ollama's --mlx-engine protocol instead of ours
        self.routes_by_mode = mlx_engine.ROUTES_BY_MODE if speaks_mlx_engine else ROUTES_BY_MODE
        self.serves_ui = serves_ui and not speaks_mlx_engine  # the web page at /: for people, not Ollama's parent
        self._error_responses: dict[str, ErrorResponder] = {}  # route -> its protocol's error form
        # Paths no route claims: the runner protocol's own form.
        self._default_error_response = mlx_engine.error_response if speaks_mlx_engine else ollama.error_response
        self.read_timeout_s = read_timeout_s
        self.off_loop = OffLoop()  # tokenizing: neither on the event loop nor on the MLX worker
        self._stopping: asyncio.Event | None = None  # made on the event loop, in app()
        self._grace_ends = 0.0  # time.monotonic() when a running job stops being waited for, once stopping
        self._finishing_streams: set[asyncio.Event] = set()  # each set once its job has sent its last event

    def begin_shutdown(self) -> None:
        """Refuse new requests and answer the in-flight ones now, without waiting for their jobs.

        A job stops at its next step, which may be seconds away on a slow CPU; the parent allows
        5 s from SIGINT to SIGKILL, so handlers answer at once and the job unwinds on its own. The
        exception is a stream that may finish (see `stream`): its running job has the grace to end.
        """
        self.state.shutting_down = True
        self._grace_ends = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        if self._stopping is not None:
            self._stopping.set()

    async def let_streams_finish(self) -> None:
        """After begin_shutdown: wait, within the grace, for the streams that may finish their running job."""
        waits = [asyncio.ensure_future(ended.wait()) for ended in self._finishing_streams]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=max(0.0, self._grace_ends - time.monotonic()))
            for wait in pending:
                wait.cancel()

    # --- app --------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors_as_responses])
        if self.speaks_mlx_engine:
            mlx_engine.register(app, self)
            return app
        app.router.add_route("*", "/health", self.health)
        for routes, error_response in PROTOCOLS:
            for path, handler in routes(self).items():
                app.router.add_post(path, handler)  # other methods: 405, from aiohttp
                self._error_responses[path] = error_response
        for path, handler in openai.get_routes(self).items():
            app.router.add_get(path, handler)
        if self.serves_ui:
            ui.register(app)
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
        responder = self._error_responses.get(request.path)
        if responder is None:  # unknown paths (GET /v1/models/{id} too): OpenAI's form under /v1/, else ours
            v1 = request.path.startswith("/v1/") and not self.speaks_mlx_engine
            responder = openai_error_response if v1 else self._default_error_response
        response = responder(request, error)
        if allow:
            response.headers["Allow"] = allow
        return response

    # --- what the routes share --------------------------------------------------------------------

    async def read_json(self, request: web.Request) -> dict:
        try:
            raw = await asyncio.wait_for(request.read(), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"request body did not arrive within {self.read_timeout_s:g} s", status=408) from None
        return parse_json_body(raw)

    def serves(self, mode: Mode, path: str) -> bool:
        return path in self.routes_by_mode[mode]

    def model_for(self, request: web.Request) -> LoadedModel:
        """The loaded model if it serves this route, else an error saying why not."""
        state = self.state
        if state.shutting_down:
            raise RequestError("the runner is shutting down", status=503)
        if state.status == "loading":
            raise RequestError(f"the model is still loading ({state.reported_progress():.0%}); poll /health",
                               status=503)
        if state.status == "error" or state.loaded is None:
            raise ModelError(f"the model failed to load: {state.error}")
        loaded = state.loaded
        if not self.serves(loaded.mode, request.path):
            serves = ", ".join(sorted(self.routes_by_mode[loaded.mode]))
            raise RequestError(
                f"{request.path} is not served by this runner: it has loaded a {loaded.mode.value} model "
                f"({loaded.name}), which serves {serves}", status=409)
        return loaded

    def submit(self, name: str, fn: Callable[[JobContext], T]) -> Job:
        try:
            return self.worker.submit(name, fn, batch=self._batch_for(name))
        except (QueueFull, WorkerStopped) as exc:
            raise RequestError(str(exc), status=503) from None

    def _batch_for(self, name: str) -> Batch | None:
        """An LLM's text generations run side by side in its batch (llm/batch.py): their MLX work all goes
        through TextModel.stream, which hands it to the batch."""
        loaded = self.state.loaded
        if loaded is None or loaded.mode is not Mode.LLM or name not in TEXT_GENERATION_JOBS:
            return None
        return loaded.text_model.batch

    async def run(self, name: str, fn: Callable[[JobContext], T]) -> T:
        """Run `fn(ctx)` on the worker and return its result (or raise its error); cancel it if the client
        goes away."""
        job = self.submit(name, fn)
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
            raise RequestError("the runner is shutting down", status=503)
        return done.result()

    async def embed(self, model: Embedder, req: EmbeddingRequest) -> EmbeddingResult:
        """An embedding job: the same whichever wire protocol the request came in on."""
        return await self.run("embedding", lambda ctx: model.embed(req.inputs, req.normalize, req.truncate,
                                                                   ctx.check_cancelled))

    async def stream(self, request: web.Request, name: str, fn: Callable[[JobContext], Message], *,
                     content_type: str = "application/x-ndjson",
                     error_line: Callable[[HttpError], Message] = lambda error: StreamError(error.message),
                     finish_on_shutdown: bool = False) -> web.StreamResponse:
        """Run a job whose events (wire messages) become JSON lines; its result is the final line.

        Headers go out with the first line, so a job that fails before producing anything (a
        prompt too long, say) still gets a proper HTTP error status. After that, an error is the
        protocol's `error_line` (ours: a final `{"error": ..., "done": true}` line).

        On shutdown the stream ends at once with an error line; with `finish_on_shutdown` (Ollama's
        parents, which read a done line without a result as success) a running job may finish within
        the grace, else the stream ends without a final line, and a job still queued is a 503.
        """
        job = self.submit(name, fn)
        response: web.StreamResponse | None = None
        ended = asyncio.Event()
        if finish_on_shutdown:
            self._finishing_streams.add(ended)

        async def send(message: Message) -> None:
            nonlocal response
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": content_type})
                await response.prepare(request)
            await response.write(ndjson_line(message.to_json()))

        events = job.events().__aiter__()
        stopping = asyncio.ensure_future(self._stopping.wait())
        next_event: asyncio.Future | None = None
        try:
            while True:
                next_event = asyncio.ensure_future(events.__anext__())
                if not await self._arrives(next_event, stopping, lambda: finish_on_shutdown and job.started):
                    next_event.cancel()
                    job.cancel("the runner is shutting down")
                    if response is None:  # nothing sent yet: a status the client can act on, not a 200
                        raise RequestError("the runner is shutting down", status=503)
                    if not finish_on_shutdown:
                        await send(error_line(HttpError(503, "the runner is shutting down")))
                    return response  # finish_on_shutdown: cut, with no final line
                try:
                    await send(next_event.result())
                except StopAsyncIteration:
                    break
        except (asyncio.CancelledError, ConnectionResetError):
            job.cancel("client disconnected")
            # The pending read would otherwise end in a StopAsyncIteration that nobody retrieves, which
            # asyncio logs as an ERROR: the last stderr line Ollama's parent shows.
            next_event.cancel()
            raise
        finally:
            stopping.cancel()
            ended.set()
            self._finishing_streams.discard(ended)
        if job.error is None:  # a job may hand its final line's last step to another thread (an image's PNG)
            result = job.result
            await send(await asyncio.wrap_future(result) if isinstance(result, Future) else result)
        elif response is None:
            raise job.error
        elif isinstance(job.error, Cancelled):  # the client knows what it asked for; the line says why it stopped
            await send(error_line(HttpError(503, str(job.error) or "cancelled")))
        else:
            await send(error_line(describe_error(job.error, request)))
        return response

    async def _arrives(self, event: asyncio.Future, stopping: asyncio.Future, may_finish: Callable[[], bool]) -> bool:
        """Whether the job's next event comes before shutdown cuts its stream: at once, or, if `may_finish()`
        when shutdown begins (a running job whose client reads a cut stream as an error), by the end of the
        grace."""
        await asyncio.wait([event, stopping], return_when=asyncio.FIRST_COMPLETED)
        if event.done() or not may_finish():
            return event.done()
        await asyncio.wait([event], timeout=max(0.0, self._grace_ends - time.monotonic()))
        return event.done()

    # --- /health ----------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        state = self.state
        if ollama.wants_server_status(request):
            status = {"ok": 200, "loading": 503, "error": 500}[state.status]
            return web.json_response(ollama.server_status(state.status, state.reported_progress()), status=status)
        if state.status == "ok" and state.loaded is not None:
            ready = HealthReady(state.loaded.mode.value, state.model_name, state.loaded.detected.architecture,
                                memory_in_use(), backend_json(state.backend))
            return web.json_response(ready.to_json())
        if state.status == "error":
            return web.json_response(HealthFailed(state.error or "").to_json(), status=500)
        return web.json_response(HealthLoading(state.reported_progress()).to_json(), status=503)
