"""`mlxrunner --model NAME --port N`: the runner process a parent server launches.

It opens the port at once (so /health can report load progress), loads the model on the worker
thread, serves until SIGINT/SIGTERM, then answers in-flight requests and exits. Exit codes
(Ollama's runner): 0 after SIGINT/SIGTERM, 1 on any load or serve error (last stderr line
`Error: <reason>`), 2 on bad flags (usage on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from mlxrunner.cli.common import add_image_model_flags, add_model_flags, fail, load_model, settings_from
from mlxrunner.cli.signals import ShutdownSignals
from mlxrunner.settings import (
    DEFAULT_HOST,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_QUEUE_DEPTH,
    DEFAULT_READ_TIMEOUT_S,
    Settings,
)

if TYPE_CHECKING:
    from mlxrunner.backend import Backend
    from mlxrunner.http.server import RunnerState
    from mlxrunner.worker import Worker

log = logging.getLogger("mlxrunner")

# Ollama's image parent launches `<ollama> runner --imagegen-engine --model M --port P`; our own
# protocol serves every mode, so that flag is accepted and ignored. `--mlx-engine` (Ollama's LLM
# parent) is a real flag: it switches the wire protocol (see http/mlx_engine.py).
IGNORED_ENGINE_FLAGS = ("--imagegen-engine", "-imagegen-engine")
ERROR_LINGER_SECONDS = 0.5  # keep /health answering 500 briefly so a poller sees the reason
WORKER_EXIT_SECONDS = 1.0  # the parent allows 5 s from SIGINT to SIGKILL


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner", allow_abbrev=False,
                                     description="Serve one model over HTTP (Ollama runner protocol).",
                                     epilog="Also: mlxrunner embed --help, mlxrunner generate --help")
    add_model_flags(parser)
    parser.add_argument("--port", "-port", required=True, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", "-host", help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--queue-depth", help=f"requests that may wait while one runs (default {DEFAULT_QUEUE_DEPTH}); "
                        "more get 503")
    parser.add_argument("--max-batch", metavar="N", help="LLMs: requests decoded together (default "
                        f"{DEFAULT_MAX_BATCH['cpu']} on the CPU, {DEFAULT_MAX_BATCH['gpu']} on a GPU; "
                        "1: one at a time)")
    parser.add_argument("--max-body-mb", help=f"largest request body in MiB (default {DEFAULT_MAX_BODY_MB})")
    parser.add_argument("--prompt-cache-size", metavar="BYTES", help="LLMs: bytes of earlier prompts' key/value "
                        "caches kept for reuse (16GB, 512MiB, ...; default 8GiB; 0 turns the cache off)")
    parser.add_argument("--mlx-engine", "-mlx-engine", action="store_true", default=None,
                        help="speak Ollama's current LLM runner protocol (/v1/status, /v1/completions); "
                        "LLMs only")
    parser.add_argument("--read-timeout", metavar="SECONDS", help="seconds a request body may take to arrive "
                        f"(default {DEFAULT_READ_TIMEOUT_S}); slower gets 408")
    parser.add_argument("--keepalive-timeout", metavar="SECONDS", help="seconds before an idle connection, or one "
                        f"whose headers never end, is closed (default {DEFAULT_KEEPALIVE_TIMEOUT_S})")
    parser.add_argument("--no-ui", action="store_true", default=None,
                        help="do not serve the web page at / (it is never served under --mlx-engine)")
    add_image_model_flags(parser)
    return parser


def strip_engine_args(argv: list[str]) -> list[str]:
    if argv and argv[0] == "runner":
        argv = argv[1:]
    return [a for a in argv if a not in IGNORED_ENGINE_FLAGS]


def main(argv: list[str], shutdown_signals: ShutdownSignals) -> int:
    """`shutdown_signals`: the handlers cli.main installed before importing this module."""
    parser = serve_parser()
    settings = settings_from(parser.parse_args(strip_engine_args(argv)), parser)
    if shutdown_signals.received:  # stopped before it began
        return 0
    try:
        return asyncio.run(serve(settings, shutdown_signals))
    except Exception as exc:  # bind failure and anything unexpected: exit 1 with the reason
        log.debug("serve failed", exc_info=True)
        return fail(str(exc) or type(exc).__name__)
    finally:
        shutdown_signals.ignore_from_now()


def release_cached_memory() -> None:
    """Give MLX's buffer cache back to the system (the worker calls this once it has gone idle)."""
    import mlx.core as mx

    mx.clear_cache()


async def serve(settings: Settings, shutdown_signals: ShutdownSignals) -> int:
    from aiohttp import web

    from mlxrunner import backend
    from mlxrunner.http.app import RunnerApp
    from mlxrunner.http.server import RunnerState
    from mlxrunner.worker import Worker

    found = backend.detect()
    log_backend(found)
    state = RunnerState(settings.model, backend=found)
    worker = Worker(max_queued=settings.queue_depth, on_idle=release_cached_memory)
    server = RunnerApp(state, worker, max_body_bytes=settings.max_body_bytes, read_timeout_s=settings.read_timeout_s,
                       speaks_mlx_engine=settings.mlx_engine, serves_ui=settings.serve_ui)
    # aiohttp's keep-alive timer starts when a connection opens, so it also closes one whose first
    # headers never end; after a response it closes one left idle.
    runner = web.AppRunner(server.app(), handler_cancellation=True, shutdown_timeout=2.0,
                           keepalive_timeout=settings.keepalive_timeout_s,
                           access_log=logging.getLogger("mlxrunner.access"))
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:
        await runner.cleanup()
        return fail(f"listen tcp {settings.host}:{settings.port}: {exc.strerror or exc}")
    host, port = runner.addresses[0][:2]
    print(f"listening on http://{host}:{port}", flush=True)
    log.info("starting mlx runner: model=%s port=%d pid=%d", settings.model, port, os.getpid())

    stop = asyncio.Event()
    shutdown_signals.attach(stop)
    try:
        reason = await load_and_serve(settings, state, worker, stop)
    finally:
        shutdown_signals.detach()
    log.info("shutting down mlx runner")
    server.begin_shutdown()  # in-flight requests get their answer now
    await server.let_streams_finish()  # but an Ollama parent's running job may end within the grace
    worker.stop()  # cancels queued jobs and the running one at its next step
    await runner.cleanup()  # stop accepting; let in-flight handlers write their last line
    if not worker.join(timeout=WORKER_EXIT_SECONDS):
        log.warning("worker still busy at exit; exiting anyway")
        _flush_and_exit(fail(reason) if reason else 0)
    return fail(reason) if reason else 0  # the Error: line last, after every log line


async def load_and_serve(settings: Settings, state: RunnerState, worker: Worker, stop: asyncio.Event) -> str | None:
    """Load the model on the worker, then serve until `stop`. Returns why loading failed, or None."""

    def progress(p: float) -> None:
        state.progress = max(state.progress, p)

    load_job = worker.submit("load", lambda ctx: load_model(settings, progress), bypass_limit=True)
    load_task = asyncio.ensure_future(load_job.wait())
    await asyncio.wait([load_task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set() or not load_task.done():
        return None
    if load_task.exception() is not None:
        exc = load_task.exception()
        reason = str(exc) or type(exc).__name__
        state.status, state.error = "error", reason
        log.error("failed to load model: %s", reason)
        await asyncio.sleep(ERROR_LINGER_SECONDS)
        return reason
    state.loaded, state.status = load_task.result(), "ok"
    log.info("mlx runner ready: mode=%s model=%s", state.loaded.mode.value, settings.model)
    await stop.wait()
    return None


def log_backend(found: Backend) -> None:
    log.info("mlx %s", found.summary())
    if found.package and "cuda" in found.package and found.name != "cuda":
        log.warning("MLX's CUDA backend (%s) is installed but sees no GPU: computing on the %s", found.package,
                    found.name)


def _flush_and_exit(code: int) -> None:
    # A worker thread stuck inside one long MLX call must not hold the process past the 5 s the
    # parent allows before SIGKILL.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
