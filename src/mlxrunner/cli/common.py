"""What the commands share: their flags, the prompt argument, Settings from flags and environment, loading, the
`Error:` line."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable

from mlxrunner import logs
from mlxrunner.progress import ProgressBar
from mlxrunner.settings import (
    CPU_DTYPES,
    DEFAULT_CPU_DTYPE,
    ENV_CPU_DTYPE,
    ENV_DENOISE_QUEUE_DEPTH,
    ENV_LOW_MEMORY,
    ENV_RELEASE_TEXT_ENCODER,
    ENV_SKIP_MEMORY_CHECK,
    Settings,
    SettingsError,
    resolve,
)

if TYPE_CHECKING:
    from mlxrunner.detect import Mode
    from mlxrunner.models import LoadedModel
    from mlxrunner.store import ModelSource


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every command: which model, where models are, logging, the memory check.

    Every flag is read as text and parsed by settings.resolve (a switch is True or None), so that a
    flag and its environment variable go through the same parser.
    """
    # Go's flag package accepts -model as well as --model; so do we.
    parser.add_argument("--model", "-model", required=True, help="model directory, Ollama model name, or embedded "
                        "model name (all-minilm)")
    parser.add_argument("--models-dir", help="Ollama model store (default: $OLLAMA_MODELS or ~/.ollama/models)")
    parser.add_argument("--log-level", "-log-level", help="trace, debug, info, warn, error "
                        "(default from OLLAMA_DEBUG)")
    parser.add_argument("--skip-memory-check", action="store_true", default=None,
                        help="load even if the weights are larger than MLX's memory limit "
                        f"(or {ENV_SKIP_MEMORY_CHECK}=1)")
    parser.add_argument("--cpu-dtype", metavar="|".join(CPU_DTYPES),
                        help="image, embedding and quantized LLM models on the CPU: float32 upcasts bf16/f16 weights "
                        "(a quantized model's scales) at load (MLX's CPU has no fast half-precision matmul), stored "
                        "keeps them (less memory) "
                        f"(default {DEFAULT_CPU_DTYPE}, or {ENV_CPU_DTYPE})")


def add_image_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that tune image models (no effect on other models)."""
    parser.add_argument("--release-text-encoder", action="store_true", default=None,
                        help="free the text encoder's memory once the prompt is encoded "
                        f"(or {ENV_RELEASE_TEXT_ENCODER}=1)")
    parser.add_argument("--low-memory", action="store_true", default=None,
                        help="hold the text encoder and the transformer in turn, never both; each is read again from "
                        f"its files on every request (or {ENV_LOW_MEMORY}=1)")
    parser.add_argument("--denoise-queue-depth", metavar="N",
                        help="transformer blocks queued ahead on the device while denoising; more overlaps more and "
                        f"holds more memory; 0 evaluates each block at once (default: the pipeline's, "
                        f"or {ENV_DENOISE_QUEUE_DEPTH})")


def add_prompt_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """The prompt, given the same way to every command: `PROMPT` or `-p/--prompt PROMPT` (see prompt_from)."""
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help=f"{what}; '-' (or no prompt, with stdin not "
                        "a terminal) reads it from stdin")
    parser.add_argument("--prompt", "-p", dest="prompt_flag", metavar="PROMPT", help="the same, as a flag")


def prompt_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The prompt add_prompt_flags read: the argument, the flag, or stdin; usage error (exit 2) if none or both.

    Text read from stdin loses its trailing newlines (what `echo` adds), so `echo TEXT | ...` prompts as
    `... TEXT` does.
    """
    if args.prompt is not None and args.prompt_flag is not None:
        parser.error("give the prompt once: as PROMPT or as --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_flag
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read().rstrip("\n") or None
    if prompt is None:
        parser.error("no prompt: give PROMPT, --prompt PROMPT, or pipe it on stdin")
    return prompt


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Settings from the parsed command line and the environment, with logging set up at their level.

    A bad flag exits 2 with the usage, as argparse does; a bad environment variable exits 1.
    """
    try:
        settings = resolve(vars(args))
    except SettingsError as exc:
        if exc.from_flag:
            parser.error(str(exc))
        sys.exit(fail(str(exc)))
    logs.setup(settings.log_level)
    return settings


def load_model(settings: Settings, progress: Callable[[float], None], warm_up: bool = True) -> LoadedModel:
    """The model the settings name, loaded with their options. Imports MLX (a BackendError if it cannot).
    `warm_up`: an image model makes a 1-step image first (a server's first request is then not slower)."""
    from mlxrunner import backend, loader
    from mlxrunner.detect import Mode

    # Ollama's --mlx-engine protocol has text generation only: an image or embedding model fails at once
    # (its parent would otherwise wait for a /v1/status that never says ready).
    modes = (Mode.LLM,) if settings.mlx_engine else None
    backend.set_cpu_dtype(settings.cpu_dtype)
    return loader.load(settings.model, progress, models_dir=settings.models_dir,
                       skip_memory_check=settings.skip_memory_check, memory_limit=settings.memory_limit,
                       release_text_encoder=settings.release_text_encoder, low_memory=settings.low_memory,
                       denoise_queue_depth=settings.denoise_queue_depth,
                       prompt_cache_bytes=settings.prompt_cache_bytes, max_batch=settings.max_batch, modes=modes,
                       warm_up=warm_up)


def find_model(settings: Settings) -> tuple[ModelSource, Mode]:
    """The model the settings name and what kind it is, from its files alone (no weights read): a command
    refuses the wrong kind before a long load. Imports MLX; a ModelError if there is no such model."""
    from mlxrunner import loader
    from mlxrunner.detect import detect

    source = loader.resolve(settings.model, settings.models_dir)
    return source, detect(source).mode


def load_with_bar(settings: Settings, warm_up: bool = True) -> LoadedModel:
    """load_model with a progress bar on stderr."""
    with ProgressBar("loading", total=100) as bar:
        return load_model(settings, lambda p: bar.update(int(p * 100)), warm_up=warm_up)


def fail(message: str) -> int:
    """The last stderr line Ollama's parent shows: `Error: <reason>`, one line. Returns exit code 1."""
    sys.stderr.flush()
    print(f"Error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return 1
