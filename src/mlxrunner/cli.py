"""Command line: the runner process, plus `mlxrunner embed` for people.

    mlxrunner --model NAME --port N [--host H]         serve (what a parent server launches)
    mlxrunner runner --imagegen-engine --model NAME --port N   Ollama's launch form, same thing
    mlxrunner embed --model NAME TEXT [TEXT ...]       print embeddings / similarities
    mlxrunner generate --model NAME --prompt TEXT -o out.png [--width --height --steps --seed
                       --negative-prompt --guidance --image PATH ...]   make an image

Exit codes (Ollama's runner): 0 after SIGINT/SIGTERM, 1 on any load or serve error (last stderr
line `Error: <reason>`), 2 on bad flags (usage on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from mlxrunner import logs
from mlxrunner.backend import BackendError
from mlxrunner.protocol import Limits

log = logging.getLogger("mlxrunner")

# Ollama's parent launches `<ollama> runner --imagegen-engine --model M --port P`; the engine
# flags select its runner kind. We serve every mode, so they are accepted and ignored.
ENGINE_FLAGS = ("--imagegen-engine", "--mlx-engine", "-imagegen-engine", "-mlx-engine")
ERROR_LINGER_SECONDS = 0.5  # keep /health answering 500 briefly so a poller sees the reason


def _add_common(parser: argparse.ArgumentParser) -> None:
    # Go's flag package accepts -model as well as --model; so do we.
    parser.add_argument("--model", "-model", required=True, help="model directory, Ollama model name, or embedded "
                        "model name (all-minilm)")
    parser.add_argument("--models-dir", help="Ollama model store (default: $OLLAMA_MODELS or ~/.ollama/models)")
    parser.add_argument("--log-level", "-log-level", help="trace, debug, info, warn, error "
                        "(default from OLLAMA_DEBUG)")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="load even if the weights are larger than MLX's memory limit")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner", allow_abbrev=False,
                                     description="Serve one model over HTTP (Ollama runner protocol).",
                                     epilog="Also: mlxrunner embed --help, mlxrunner generate --help")
    _add_common(parser)
    parser.add_argument("--port", "-port", type=int, required=True, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", "-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--queue-depth", type=int, default=Limits.max_queue,
                        help=f"requests that may wait while one runs (default {Limits.max_queue}); more get 503")
    parser.add_argument("--max-body-mb", type=int, default=Limits.max_body_bytes >> 20,
                        help=f"largest request body in MiB (default {Limits.max_body_bytes >> 20})")
    return parser


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner embed", allow_abbrev=False,
                                     description="Embed texts and print the vectors' cosine similarities.")
    _add_common(parser)
    parser.add_argument("texts", nargs="*", help="texts to embed")
    parser.add_argument("--input-file", help="embed each line of this file ('-' = stdin)")
    parser.add_argument("--json", action="store_true", help="print {\"embeddings\": [[...]]} as JSON")
    parser.add_argument("--no-normalize", action="store_true", help="skip the model's L2 normalisation")
    return parser


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner generate", allow_abbrev=False,
                                     description="Generate one image with an image model and write it as PNG.")
    _add_common(parser)
    parser.add_argument("--prompt", "-p", required=True, help="what to draw")
    parser.add_argument("--output", "-o", default="image.png", help="PNG file to write (default image.png)")
    parser.add_argument("--width", type=int, help="pixels (default 1024, or the first --image's width); "
                        "rounded down to the model's multiple")
    parser.add_argument("--height", type=int, help="pixels (default 1024, or the first --image's height); rounded down likewise")
    parser.add_argument("--steps", type=int, help="denoising steps = transformer evaluations (default: the model's)")
    parser.add_argument("--seed", type=int, help="any 64-bit integer (default: random; printed)")
    parser.add_argument("--negative-prompt", help="what to steer away from (models with true CFG)")
    parser.add_argument("--guidance", type=float, help="CFG scale, diffusers' guidance_scale (models with true CFG)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="reference image for editing (repeatable; models that edit)")
    parser.add_argument("--release-text-encoder", action="store_true",
                        help="free the text encoder's memory once the prompt is encoded")
    return parser


def _strip_engine_args(argv: list[str]) -> list[str]:
    if argv and argv[0] == "runner":
        argv = argv[1:]
    return [a for a in argv if a not in ENGINE_FLAGS]


def _setup_logging(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        level = logs.level_from_name(args.log_level) if args.log_level else \
            logs.level_from_ollama_debug(logs.ollama_var("OLLAMA_DEBUG"))
    except ValueError as exc:
        parser.error(str(exc))
    logs.setup(level)


def fail(message: str) -> int:
    """The last stderr line Ollama's parent shows: `Error: <reason>`, one line."""
    sys.stderr.flush()
    print(f"Error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "embed":
        return embed_main(argv[1:])
    if argv and argv[0] == "generate":
        return generate_main(argv[1:])
    parser = serve_parser()
    args = parser.parse_args(_strip_engine_args(argv))
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: {args.port} is not a TCP port (0-65535)")
    if args.queue_depth < 0 or args.max_body_mb < 1:
        parser.error("--queue-depth must be >= 0 and --max-body-mb >= 1")
    _setup_logging(args, parser)
    try:
        return asyncio.run(serve(args))
    except Exception as exc:  # bind failure and anything unexpected: exit 1 with the reason
        log.debug("serve failed", exc_info=True)
        return fail(str(exc) or type(exc).__name__)


def release_cached_memory() -> None:
    """Give MLX's buffer cache back to the system (the worker calls this once it has gone idle)."""
    import mlx.core as mx

    mx.clear_cache()


async def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from mlxrunner import backend, loader
    from mlxrunner.server import RunnerState, Server
    from mlxrunner.worker import Worker

    log_backend(backend.detect())
    loader.apply_memory_limit_from_env()
    state = RunnerState(args.model)
    limits = Limits(max_queue=args.queue_depth, max_body_bytes=args.max_body_mb << 20)
    worker = Worker(max_queued=limits.max_queue, on_idle=release_cached_memory)
    server = Server(state, worker, limits)
    app = server.app()
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0,
                           access_log=logging.getLogger("mlxrunner.access"))
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        return fail(f"listen tcp {args.host}:{args.port}: {exc.strerror or exc}")
    host, port = runner.addresses[0][:2]
    print(f"listening on http://{host}:{port}", flush=True)
    log.info("starting mlx runner: model=%s port=%d pid=%d", args.model, port, os.getpid())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def progress(p: float) -> None:
        state.progress = max(state.progress, p)

    load_job = worker.submit("load", lambda ctx: loader.load(args.model, progress, args.skip_memory_check,
                                                               args.models_dir), bypass_limit=True)
    load_task = asyncio.ensure_future(load_job.wait())
    await asyncio.wait([load_task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)

    exit_code, reason = 0, None
    if load_task.done() and not stop.is_set():
        if load_task.exception() is not None:
            exc = load_task.exception()
            reason = str(exc) or type(exc).__name__
            state.status, state.error = "error", reason
            log.error("failed to load model: %s", reason)
            await asyncio.sleep(ERROR_LINGER_SECONDS)
            exit_code = 1
        else:
            state.loaded, state.status = load_task.result(), "ok"
            log.info("mlx runner ready: mode=%s model=%s", state.loaded.mode.value, args.model)
            await stop.wait()
    log.info("shutting down mlx runner")
    server.begin_shutdown()  # in-flight requests get their answer now
    worker.stop()  # cancels queued jobs and the running one at its next step
    await runner.cleanup()  # stop accepting; let in-flight handlers write their last line
    if not worker.join(timeout=1.0):
        log.warning("worker still busy at exit; exiting anyway")
        _flush_and_exit(fail(reason) if reason else exit_code)
    return fail(reason) if reason else exit_code


def log_backend(found) -> None:
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


# --- mlxrunner embed ----------------------------------------------------------------------------


def embed_main(argv: list[str]) -> int:
    parser = embed_parser()
    args = parser.parse_args(argv)
    texts = list(args.texts)
    if args.input_file:
        stream = sys.stdin if args.input_file == "-" else open(args.input_file, encoding="utf-8")
        with stream:
            texts += [line.rstrip("\n") for line in stream]
    if not texts:
        parser.error("nothing to embed: give TEXT arguments or --input-file")
    _setup_logging(args, parser)

    try:
        from mlxrunner import loader
    except BackendError as exc:
        return fail(str(exc))
    from mlxrunner.detect import Mode
    from mlxrunner.progress import ProgressBar

    try:
        loader.apply_memory_limit_from_env()
        with ProgressBar("loading", total=100) as bar:
            loaded = loader.load(args.model, lambda p: bar.update(int(p * 100)), args.skip_memory_check,
                                 args.models_dir)
        if loaded.mode is not Mode.EMBEDDING:
            return fail(f"{args.model} is a {loaded.mode.value} model, not an embedding model")
        vectors = _embed_with_progress(loaded.model, texts, normalize=False if args.no_normalize else None)
    except Exception as exc:
        log.debug("embed failed", exc_info=True)
        return fail(str(exc))
    if args.json:
        print(json.dumps({"embeddings": vectors.tolist()}))
    else:
        _print_similarities(texts, vectors)
    return 0


def _embed_with_progress(model, texts: list[str], normalize):
    import numpy as np

    from mlxrunner.progress import ProgressBar

    chunk = 64
    parts = []
    with ProgressBar("embedding", total=len(texts)) as bar:
        for start in range(0, len(texts), chunk):
            parts.append(model.embed(texts[start:start + chunk], normalize=normalize).vectors)
            bar.update(min(len(texts), start + chunk))
    return np.concatenate(parts)


def _print_similarities(texts: list[str], vectors) -> None:
    import numpy as np

    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    unit = vectors / norms
    print(f"{len(texts)} embeddings of {vectors.shape[1]} dimensions")
    for i, text in enumerate(texts):
        head = ", ".join(f"{x:+.4f}" for x in vectors[i, :4])
        print(f"[{i}] [{head}, ...]  {text[:60]!r}")
    if len(texts) > 1:
        print("cosine similarity:")
        sims = unit @ unit.T
        for i in range(len(texts)):
            print(f"[{i}] " + " ".join(f"{s:+.3f}" for s in sims[i]))


# --- mlxrunner generate -------------------------------------------------------------------------


def generate_main(argv: list[str]) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    _setup_logging(args, parser)

    try:
        from mlxrunner import loader
    except BackendError as exc:
        return fail(str(exc))
    from mlxrunner.detect import Mode
    from mlxrunner.imagegen import images as image_io
    from mlxrunner.progress import ProgressBar

    limits = Limits()
    try:
        references = []
        for i, path in enumerate(args.image):
            try:
                blob = open(path, "rb").read()
            except OSError as exc:
                return fail(f"--image {path}: {exc.strerror or exc}")
            references.append(image_io.decode_image(blob, path, limits))
        loader.apply_memory_limit_from_env()
        if args.release_text_encoder:
            os.environ[loader.ENV_RELEASE_TEXT_ENCODER] = "1"
        with ProgressBar("loading", total=100) as bar:
            loaded = loader.load(args.model, lambda p: bar.update(int(p * 100)), args.skip_memory_check,
                                 args.models_dir)
        if loaded.mode is not Mode.IMAGEGEN:
            return fail(f"{args.model} is a {loaded.mode.value} model, not an image model")
        bar = None

        def progress(step: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = ProgressBar("denoising", total=total).__enter__()
            bar.update(step)

        try:
            result = loaded.model.run(args.prompt, width=args.width, height=args.height, steps=args.steps,
                                      seed=args.seed, negative_prompt=args.negative_prompt, guidance=args.guidance,
                                      images=references or None, progress=progress)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        with open(args.output, "wb") as out:
            out.write(image_io.png_bytes(result.image, result.png_text(args.prompt)))
    except KeyboardInterrupt:
        return fail("interrupted")
    except Exception as exc:
        log.debug("generate failed", exc_info=True)
        return fail(str(exc))
    note = f" (ignored: {', '.join(result.ignored)})" if result.ignored else ""
    steps = f"{result.steps} step" + ("s" if result.steps != 1 else "")
    print(f"wrote {args.output}: {result.width}x{result.height}, {steps}, seed {result.seed}, "
          f"{result.timings['total']:.2f}s{note}")
    return 0
