"""The runner protocol Ollama's parent speaks: /completion, /embedding, /tokenize, /detokenize.

/completion streams NDJSON: text chunks then a final line (LLM), or progress lines then the image
(image models). Errors are plain text, as Go's http.Error writes them and Ollama's parents show
them; a client that sends `Accept: application/json` (our launcher) gets `{"error": "..."}` and,
in a stream cut by shutdown, a typed error line. The contract is docs/protocol.md.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

from aiohttp import web

from mlxrunner.detect import Mode
from mlxrunner.errors import RequestError
from mlxrunner.http import protocol
from mlxrunner.http.protocol import (
    CompletionRequest,
    DetokenizeResponse,
    EmbeddingResponse,
    EmbeddingsResponse,
    ErrorResponse,
    ImageDone,
    ImageProgress,
    TextChunk,
    TextDone,
    TokenizeResponse,
)
from mlxrunner.http.server import JSON_COMPLETION_JOB
from mlxrunner.models import ImageModel, TextModel
from mlxrunner.request import Limits
from mlxrunner.worker import JobContext

if TYPE_CHECKING:
    from mlxrunner.http.server import Handler, HttpError, Server
    from mlxrunner.llm.answer import Completion


def routes(server: Server) -> dict[str, Handler]:
    handlers = OllamaRoutes(server)
    return {"/completion": handlers.completion, "/embedding": handlers.embedding, "/tokenize": handlers.tokenize,
            "/detokenize": handlers.detokenize}


def asks_for_json(request: web.Request) -> bool:
    """Whether the client asked for typed errors (Ollama's Go parents send no Accept header)."""
    return "application/json" in request.headers.get("Accept", "")


def error_response(request: web.Request, error: HttpError) -> web.Response:
    if asks_for_json(request):
        return web.json_response(ErrorResponse(error.message).to_json(), status=error.status)
    return plain_text_error(error)


# Ollama's llmServer reads /health as {"status": <its ServerStatus, an integer>, "progress"}, and is the one
# caller that sends `Content-Type: application/json` on that GET; Ollama's image parent reads only the
# HTTP status, and our launcher reads our form ({"status": "ok", ...}).
SERVER_STATUS = {"ok": 0, "loading": 3, "error": 5}  # ServerStatusReady, ...LoadingModel, ...Error


def wants_server_status(request: web.Request) -> bool:
    return request.method == "GET" and request.content_type == "application/json"


def server_status(status: str, progress: float) -> dict:
    return {"status": SERVER_STATUS[status], "progress": round(progress, 4)}


def plain_text_error(error: HttpError) -> web.Response:
    """An error as Go's http.Error writes it, which Ollama's parents show as it is."""
    return web.Response(text=f"{error.message}\n", status=error.status, charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


class OllamaRoutes:
    def __init__(self, server: Server):
        self.server = server

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.read_json(request)
        loaded = self.server.model_for(request)
        req = protocol.parse_completion(body, self.server.limits)
        if loaded.mode is Mode.IMAGEGEN:
            job = image_job(loaded.image_model, req, self.server.limits)
        else:
            job = text_job(loaded.text_model, req)
        name = JSON_COMPLETION_JOB if req.json_output and loaded.mode is Mode.LLM else "completion"
        return await self.server.stream(request, name, job, finish_on_shutdown=not asks_for_json(request))

    async def embedding(self, request: web.Request) -> web.Response:
        body = await self.server.read_json(request)
        model = self.server.model_for(request).embedder
        req = protocol.parse_embedding(body, self.server.limits)
        result = await self.server.embed(model, req)
        if req.ollama_form:
            return web.json_response(EmbeddingResponse(result.vectors[0].tolist(), result.token_count).to_json())
        return web.json_response(EmbeddingsResponse(result.vectors.tolist(), result.token_count).to_json())

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self.server.read_json(request)
        model = self.server.model_for(request).embedder
        req = protocol.parse_tokenize(body)
        tokens = await self.server.off_loop.run("tokenize", lambda: model.tokenize(req.content))
        return web.json_response(TokenizeResponse(tokens).to_json())

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self.server.read_json(request)
        model = self.server.model_for(request).embedder
        req = protocol.parse_detokenize(body)

        def work() -> str:
            try:
                return model.detokenize(req.tokens)
            except ValueError as exc:  # detokenize's one ValueError: an id outside the vocabulary (tokenizer only)
                raise RequestError(f'field "tokens": {exc}', field="tokens") from None

        return web.json_response(DetokenizeResponse(await self.server.off_loop.run("detokenize", work)).to_json())


def text_job(model: TextModel, req: CompletionRequest) -> Callable[[JobContext], TextDone]:
    """The worker job of an LLM completion: text chunks as they come, then the final line."""

    def generate(ctx: JobContext) -> TextDone:
        completion = None
        for item in model.stream(req.prompt, req.options, ctx.check_cancelled, json_output=req.json_output,
                                 json_schema=req.json_schema):
            if isinstance(item, str):
                ctx.emit(TextChunk(item))
            else:
                completion = item
        return text_done(completion)

    return generate


def text_done(completion: Completion) -> TextDone:
    return TextDone(done_reason=completion.done_reason, stop_reason=completion.stop_reason,
                    prompt_eval_count=completion.prompt_eval_count, prompt_cache_count=completion.prompt_cache_count,
                    prompt_eval_duration=completion.prompt_eval_duration, eval_count=completion.eval_count,
                    eval_duration=completion.eval_duration)


def image_job(model: ImageModel, req: CompletionRequest,
              limits: Limits) -> Callable[[JobContext], Future[ImageDone]]:
    """The worker job of an image request: progress lines {"step", "total"}, then the image; its final line is
    finished (PNG, base64) on the PNG thread, so the worker is free for the next job meanwhile."""
    from mlxrunner.imagegen import images as image_io

    def generate(ctx: JobContext) -> Future[ImageDone]:
        def progress(step: int, total: int) -> None:
            ctx.check_cancelled()  # raises Cancelled through the C++ loop: the job stops here
            ctx.emit(ImageProgress(step, total))

        references = image_io.decode_request_images(req.images, limits)
        result = model.run(req.prompt, width=req.width, height=req.height, steps=req.steps, seed=req.seed,
                           negative_prompt=req.negative_prompt, guidance=req.guidance, images=references or None,
                           progress=progress, check_cancelled=ctx.check_cancelled, cache_threshold=req.cache_threshold,
                           vae_tile=req.vae_tile)
        cache = result.step_cache
        done = functools.partial(
            ImageDone, seed=result.seed, width=result.width, height=result.height, steps=result.steps,
            timings_ms={phase: round(seconds * 1000, 1) for phase, seconds in result.timings.items()},
            ignored=list(result.ignored) + (["options"] if req.has_options else []) + (["format"] if req.json_output
                                                                                        else []),
            prompt_truncated=result.prompt_truncated,
            cache=cache and {"threshold": round(cache.threshold, 6), "computed": cache.computed,
                             "skipped": cache.skipped})
        text = result.png_text(req.prompt)
        return image_io.on_png_thread(lambda: done(image=image_io.png_base64(result.image, text)))

    return generate
