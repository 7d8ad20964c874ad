"""The HTTP server (aiohttp): /health, /completion, /tokenize, /detokenize, /embedding, /v1/embeddings.

Handlers never touch MLX: they validate the request (protocol.py), submit a job to the worker
thread (worker.py) and await it. The port opens before the model has loaded, so /health can
report load progress; /health never waits for a job. A client that goes away cancels its job,
queued or running (aiohttp cancels the handler; the handler cancels the job).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from mlxrunner import protocol
from mlxrunner.detect import Mode
from mlxrunner.loader import LoadedModel
from mlxrunner.protocol import Limits, RequestError
from mlxrunner.worker import Cancelled, Job, QueueFull, Worker, WorkerStopped

log = logging.getLogger(__name__)

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


def memory_in_use() -> dict[str, int]:
    """MLX's allocator, in bytes: arrays alive (weights, a job's activations), buffers kept for reuse
    (given back once the runner is idle, see Worker), and the peak of arrays alive since start."""
    import mlx.core as mx

    return {"active_bytes": mx.get_active_memory(), "cache_bytes": mx.get_cache_memory(),
            "peak_bytes": mx.get_peak_memory()}


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class Server:
    def __init__(self, state: RunnerState, worker: Worker, limits: Limits = Limits()):
        self.state = state
        self.worker = worker
        self.limits = limits
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
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._errors_as_json])
        app.router.add_route("*", "/health", self.health)
        app.router.add_route("*", "/completion", self._post_only(self.completion))
        app.router.add_route("*", "/tokenize", self._post_only(self.tokenize))
        app.router.add_route("*", "/detokenize", self._post_only(self.detokenize))
        app.router.add_route("*", "/embedding", self._post_only(self.embedding))
        app.router.add_route("*", "/v1/embeddings", self._post_only(self.openai_embeddings))
        return app

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler):
        try:
            return await handler(request)
        except RequestError as exc:
            return json_error(exc.status, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body is larger than the limit of {self.limits.max_body_bytes} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_error(exc.status, f"{exc.reason}: {request.method} {request.path}")

    @staticmethod
    def _post_only(handler):
        async def wrapped(request: web.Request):
            if request.method != "POST":
                return web.json_response({"error": f"method {request.method} not allowed on {request.path}; use POST"},
                                         status=405, headers={"Allow": "POST"})
            return await handler(request)

        return wrapped

    # --- shared request steps ---------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict:
        return protocol.parse_json_body(await request.read())

    def _model_for(self, request: web.Request) -> LoadedModel:
        """The loaded model if it serves this route, else an HTTP error saying why not."""
        state = self.state
        if state.shutting_down:
            raise RequestError("the runner is shutting down", status=503)
        if state.status == "loading":
            raise RequestError(f"the model is still loading ({state.progress:.0%}); poll /health", status=503)
        if state.status == "error" or state.loaded is None:
            raise RequestError(f"the model failed to load: {state.error}", status=500)
        loaded = state.loaded
        if request.path not in ROUTES_BY_MODE[loaded.mode]:
            serves = ", ".join(sorted(ROUTES_BY_MODE[loaded.mode]))
            raise RequestError(
                f"{request.path} is not served by this runner: it has loaded a {loaded.mode.value} model "
                f"({loaded.name}), which serves {serves}", status=409)
        return loaded

    def _submit(self, name: str, fn) -> Job:
        try:
            return self.worker.submit(name, fn)
        except QueueFull as exc:
            raise RequestError(str(exc), status=503) from None
        except WorkerStopped as exc:
            raise RequestError(str(exc), status=503) from None

    async def _run(self, name: str, fn) -> Any:
        """Run `fn(ctx)` on the worker and return its result; cancel it if the client goes away."""
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
        if done.exception() is not None:
            raise self._as_request_error(done.exception()) from None
        return done.result()

    # --- routes -----------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        state = self.state
        if state.status == "ok" and state.loaded is not None:
            return web.json_response({"status": "ok", "mode": state.loaded.mode.value, "model": state.model_name,
                                      "memory": memory_in_use()})
        if state.status == "error":
            return web.json_response({"status": "error", "error": state.error}, status=500)
        return web.json_response({"status": "loading", "progress": round(state.progress, 4)}, status=503)

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        loaded = self._model_for(request)
        req = protocol.parse_completion(body, self.limits)
        if loaded.mode is Mode.IMAGEGEN:
            return await self._stream(request, "completion", self._image_job(loaded.model, req, body))
        model = loaded.model

        def generate(ctx):
            from mlxrunner.llm.model import PromptTooLong

            try:
                for item in model.stream(req.prompt, req.options, ctx.check_cancelled):
                    if isinstance(item, str):
                        ctx.emit({"content": item, "done": False})
                    else:
                        return item.final_line()
            except PromptTooLong as exc:
                raise RequestError(f'field "prompt": {exc}') from None

        return await self._stream(request, "completion", generate)

    def _image_job(self, pipeline, req: protocol.CompletionRequest, body: dict):
        """The worker job for an image request: progress lines {"step", "total"}, then the image."""
        from mlxrunner.imagegen import images as image_io

        def generate(ctx):
            def progress(step: int, total: int) -> None:
                ctx.check_cancelled()  # raises Cancelled through the C++ loop: the job stops here
                ctx.emit({"step": step, "total": total, "done": False})

            try:
                result = pipeline.run(req.prompt, width=req.width, height=req.height, steps=req.steps, seed=req.seed,
                                      negative_prompt=req.negative_prompt, guidance=req.guidance,
                                      images=image_io.decode_request_images(req.images, self.limits) or None,
                                      progress=progress)
            except image_io.BadImage as exc:
                raise RequestError(str(exc)) from None
            except ValueError as exc:  # a size, step count or latent shape the model cannot take
                raise RequestError(str(exc)) from None
            ignored = list(result.ignored) + (["options"] if body.get("options") is not None else [])
            line = {"image": image_io.png_base64(result.image, result.png_text(req.prompt)), "seed": result.seed,
                    "width": result.width, "height": result.height, "steps": result.steps, "done": True,
                    "timings": {f"{phase}_ms": round(seconds * 1000, 1) for phase, seconds in result.timings.items()}}
            if ignored:
                line["ignored"] = ignored
            if result.prompt_truncated:
                line["prompt_truncated"] = True
            return line

        return generate

    async def _stream(self, request: web.Request, name: str, fn) -> web.StreamResponse:
        """Run a job whose events become NDJSON lines; its result is the final line.

        Headers go out with the first line, so a job that fails before producing anything (a
        prompt too long, say) still gets a proper HTTP error status. After that, an error is a
        final `{"error": ..., "done": true}` line.
        """
        job = self._submit(name, fn)
        response: web.StreamResponse | None = None

        async def send(obj: dict) -> None:
            nonlocal response
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
            await response.write(protocol.ndjson_line(obj))

        events = job.events().__aiter__()
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                next_event = asyncio.ensure_future(events.__anext__())
                await asyncio.wait([next_event, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not next_event.done():
                    next_event.cancel()
                    job.cancel("the runner is shutting down")
                    await send(protocol.stream_error("the runner is shutting down"))
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
            raise self._as_request_error(job.error)
        else:
            await send(protocol.stream_error(str(job.error) or type(job.error).__name__))
        return response

    @staticmethod
    def _as_request_error(error: BaseException) -> RequestError:
        if isinstance(error, RequestError):
            return error
        if isinstance(error, Cancelled):
            return RequestError(f"request cancelled: {error}", status=503)
        log.error("job failed: %r", error)
        return RequestError(str(error) or type(error).__name__, status=500)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        model = self._model_for(request).model
        content = protocol.parse_tokenize(body)
        tokens = await self._run("tokenize", lambda ctx: model.tokenize(content))
        return web.json_response({"tokens": tokens})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        model = self._model_for(request).model
        tokens = protocol.parse_detokenize(body)

        def work(ctx):
            try:
                return model.detokenize(tokens)
            except ValueError as exc:  # an id outside the vocabulary
                raise RequestError(f'field "tokens": {exc}') from None

        return web.json_response({"content": await self._run("detokenize", work)})

    async def _embed(self, request: web.Request, req: protocol.EmbeddingRequest):
        model = self._model_for(request).model

        def work(ctx):
            from mlxrunner.embed.bert import InputTooLong

            try:
                return model.embed(req.inputs, req.normalize, req.truncate, ctx.check_cancelled)
            except InputTooLong as exc:
                raise RequestError(str(exc)) from None

        return await self._run("embedding", work)

    async def embedding(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._model_for(request)
        req = protocol.parse_embedding(body, self.limits)
        result = await self._embed(request, req)
        if req.ollama_form:
            return web.json_response({"embedding": result.vectors[0].tolist()})
        return web.json_response({"embeddings": result.vectors.tolist(), "prompt_eval_count": result.token_count})

    async def openai_embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's POST /v1/embeddings: input, encoding_format (float|base64), dimensions."""
        try:
            body = await self._body(request)
            loaded = self._model_for(request)
            req = protocol.parse_embedding({"input": body.get("input")}, self.limits)
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise RequestError('field "encoding_format" must be "float" or "base64"')
            dimensions = protocol._int_field(body, "dimensions", 1, loaded.model.dims)
        except RequestError as exc:
            return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error"}},
                                     status=exc.status)
        result = await self._embed(request, req)
        vectors = result.vectors
        if dimensions is not None:  # Matryoshka-style: cut, then re-normalise as OpenAI does
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        data = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64" else v.tolist()}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": result.token_count, "total_tokens": result.token_count}
        return web.json_response({"object": "list", "data": data, "model": body.get("model") or loaded.name,
                                  "usage": usage})
