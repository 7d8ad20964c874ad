"""What every route shares: running a job on the worker, streaming its events, the loaded model a request
may use, and whose fault an error is.

Handlers never touch MLX: they validate the request (protocol.py), submit a job to the worker
thread (worker.py) and await it. Each wire protocol's routes live in its own module (ollama.py,
openai.py, mlx_engine.py) and take the `Server` they run on; app.py puts them together into the
aiohttp application (`RunnerApp`, a Server with its routes, /health and error forms). The port opens
before the model has loaded, so /health can report load progress; /health never waits for a job. A
client that goes away cancels its job, queued or running (aiohttp cancels the handler; the handler
cancels the job).

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
from typing import TYPE_CHECKING, Awaitable, Callable, Collection, Mapping, TypeVar

from aiohttp import web

from mlxrunner.detect import Mode
from mlxrunner.errors import Cancelled, ModelError, RequestError
from mlxrunner.http.off_loop import OffLoop
from mlxrunner.http.protocol import EmbeddingRequest, Message, StreamError, ndjson_line, parse_json_body
from mlxrunner.models import Embedder, LoadedModel
from mlxrunner.request import Limits
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
# An answer held to JSON decides each next token on the host before the next step (csrc/text/generate.h), so it
# runs alone, in a job of its own between the batch's runs, not as a row of the batch.
JSON_COMPLETION_JOB = "completion held to JSON"


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
    """The services the routes share. `routes_by_mode`: the paths each kind of model serves (app.py's tables),
    so that a request to a route the loaded model cannot answer is a clear 409."""

    def __init__(self, state: RunnerState, worker: Worker, routes_by_mode: Mapping[Mode, Collection[str]],
                 limits: Limits = Limits(), max_body_bytes: int = DEFAULT_MAX_BODY_MB * MIB,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
        self.state = state
        self.worker = worker
        self.routes_by_mode = routes_by_mode
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.off_loop = OffLoop()  # tokenizing: neither on the event loop nor on the MLX worker
        self._stopping = asyncio.Event()  # set by begin_shutdown (an Event binds to the loop that first waits on it)
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
        self._stopping.set()

    async def let_streams_finish(self) -> None:
        """After begin_shutdown: wait, within the grace, for the streams that may finish their running job."""
        waits = [asyncio.ensure_future(ended.wait()) for ended in self._finishing_streams]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=max(0.0, self._grace_ends - time.monotonic()))
            for wait in pending:
                wait.cancel()

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
