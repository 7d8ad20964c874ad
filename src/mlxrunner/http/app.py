"""The runner's HTTP application: the routes each kind of model serves, /health, and every error answered in the
form of the protocol its path speaks.

`RunnerApp` is the `Server` (server.py: what every route shares) with its routes: the Ollama runner protocol
(ollama.py) and OpenAI's (openai.py) side by side, or, under --mlx-engine, Ollama's current LLM runner protocol
(mlx_engine.py) alone. Which paths each mode serves is declared here only (ROUTES_BY_MODE; mlx_engine.py has
its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from aiohttp import web

from mlxrunner.detect import Mode
from mlxrunner.http import mlx_engine, ollama, openai, openai_replies, ui
from mlxrunner.http.protocol import HealthFailed, HealthLoading, HealthReady
from mlxrunner.http.server import Handler, HttpError, RunnerState, Server, describe_error

if TYPE_CHECKING:
    from mlxrunner.backend import Backend
    from mlxrunner.worker import Worker

ErrorResponder = Callable[[web.Request, HttpError], web.Response]


def openai_error_response(request: web.Request, error: HttpError) -> web.Response:
    """OpenAI's error body, with the headers its clients read (retry or not, and when)."""
    return web.json_response(openai_replies.error_json(error), status=error.status,
                             headers=openai_replies.error_headers(error))


# Our protocols: each module's routes(server) gives its POST routes, paired with how it answers errors.
# Under --mlx-engine, mlx_engine.register(app, server) replaces them all (Ollama's LLM runner protocol).
PROTOCOLS = ((ollama.routes, ollama.error_response), (openai.routes, openai_error_response))

# What each mode serves, so a request to a route the loaded model cannot answer is a clear 409.
ROUTES_BY_MODE = {
    Mode.EMBEDDING: {"/embedding", "/v1/embeddings", "/tokenize", "/detokenize"},
    Mode.LLM: {"/completion", "/embedding", "/v1/embeddings", "/tokenize", "/detokenize", "/v1/chat/completions",
               "/v1/responses", "/v1/completions"},
    Mode.IMAGEGEN: {"/completion", "/v1/images/generations", "/v1/images/edits"},
}


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


class RunnerApp(Server):
    """The Server with its routes. `speaks_mlx_engine`: Ollama's --mlx-engine protocol instead of ours;
    `serves_ui`: the web page at / (for people, so never for Ollama's parent)."""

    def __init__(self, state: RunnerState, worker: Worker, *, speaks_mlx_engine: bool = False, serves_ui: bool = True,
                 **server_options):
        routes_by_mode = mlx_engine.ROUTES_BY_MODE if speaks_mlx_engine else ROUTES_BY_MODE
        super().__init__(state, worker, routes_by_mode, **server_options)
        self.speaks_mlx_engine = speaks_mlx_engine
        self.serves_ui = serves_ui and not speaks_mlx_engine
        self._error_responses: dict[str, ErrorResponder] = {}  # route -> its protocol's error form
        # Paths no route claims: the runner protocol's own form.
        self._default_error_response = mlx_engine.error_response if speaks_mlx_engine else ollama.error_response

    def app(self) -> web.Application:
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
        for path, handler in openai.delete_routes(self).items():
            app.router.add_delete(path, handler)
        if self.serves_ui:
            ui.register(app)
        return app

    # --- errors -----------------------------------------------------------------------------------

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
