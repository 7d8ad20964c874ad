"""Every setting of the runner, read once: a flag wins over its environment variable, which wins over the default.

| setting               | flag                            | environment variable             | default            |
|-----------------------|---------------------------------|----------------------------------|--------------------|
| model store           | --models-dir                    | OLLAMA_MODELS                    | ~/.ollama/models   |
| log level             | --log-level                     | OLLAMA_DEBUG (Ollama's meaning)  | info               |
| skip the memory check | --skip-memory-check             | MLXRUNNER_SKIP_MEMORY_CHECK      | off                |
| MLX memory limit      |                                 | MLXRUNNER_MEMORY_LIMIT (16GB...) | MLX's own          |
| free the text encoder | --release-text-encoder          | MLXRUNNER_RELEASE_TEXT_ENCODER   | off                |
| text encoder and DiT in turn | --low-memory             | MLXRUNNER_LOW_MEMORY             | off                |
| denoise queue depth   | --denoise-queue-depth           | MLXRUNNER_DENOISE_QUEUE_DEPTH    | the pipeline's (2) |
| CPU compute dtype     | --cpu-dtype                     | MLXRUNNER_CPU_DTYPE              | float32            |
| listen address        | --host, --port                  |                                  | 127.0.0.1, -       |
| request queue depth   | --queue-depth                   |                                  | 16                 |
| largest request body  | --max-body-mb                   |                                  | 64 MiB             |
| prompt cache (LLMs)   | --prompt-cache-size (bytes)     |                                  | 8 GiB              |
| Ollama's LLM wire     | --mlx-engine                    |                                  | off                |
| the web page at /     | --no-ui                         |                                  | served             |
| body read timeout     | --read-timeout                  |                                  | 60 s               |
| idle/header timeout   | --keepalive-timeout             |                                  | 60 s               |
| CPU BLAS (Linux)      |                                 | MLXRUNNER_CPU_BLAS               | auto: MKL, OpenBLAS|
| fused kernels on CPU  |                                 | MLXRUNNER_FUSE_ON_CPU (C++ reads)| off                |
| CPU kernel loops cap  |                                 | MLXRUNNER_CPU_LOOPS (C++ reads)  | avx512 (the best)  |

Boolean variables take 1/t/true/yes/on or 0/f/false/no/off (any case); values are trimmed of spaces
and quotes, as Ollama's envconfig does; an empty variable counts as unset. A value that does not
parse is an error naming the variable, never silently ignored.

This module imports nothing heavy: mlxrunner/__init__.py asks it about the BLAS before MLX loads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from mlxrunner import logs

ENV_SKIP_MEMORY_CHECK = "MLXRUNNER_SKIP_MEMORY_CHECK"
ENV_MEMORY_LIMIT = "MLXRUNNER_MEMORY_LIMIT"
# Image models: free the text encoder after each prompt encode (reloaded from the mmap'd weights on
# the next request). Saves its memory (8 GB for Z-Image's Qwen3-4B in bf16) at some time per request.
ENV_RELEASE_TEXT_ENCODER = "MLXRUNNER_RELEASE_TEXT_ENCODER"
# Image models: hold the text encoder and the transformer in turn, never both (each read again from its files
# on every request): the peak is the larger of the two plus the VAE, instead of all three.
ENV_LOW_MEMORY = "MLXRUNNER_LOW_MEMORY"
ENV_DENOISE_QUEUE_DEPTH = "MLXRUNNER_DENOISE_QUEUE_DEPTH"
# Image and embedding models on the CPU: "float32" (bf16/f16 weights upcast at load) or "stored" (why:
# backend.compute_weights).
ENV_CPU_DTYPE = "MLXRUNNER_CPU_DTYPE"
CPU_DTYPES = ("float32", "stored")
DEFAULT_CPU_DTYPE = "float32"
ENV_CPU_BLAS = "MLXRUNNER_CPU_BLAS"
# Which BLAS serves MLX's CPU matrix products on Linux: auto = MKL where the `mkl` package is installed (the
# `mkl` extra), else OpenBLAS; "reference" keeps MLX's own netlib BLAS (tens of times slower).
CPU_BLAS_CHOICES = ("auto", "mkl", "openblas", "reference")
DEFAULT_CPU_BLAS = "auto"
ENV_OLLAMA_DEBUG = "OLLAMA_DEBUG"
ENV_OLLAMA_MODELS = "OLLAMA_MODELS"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_QUEUE_DEPTH = 16
# LLM requests decoded together (llm/batch.py), per backend. A decode step reads the weights once for all its
# rows: on the 2-core test VM a step of 8 rows of a 0.6B model took what a step of 4 did; on an H100, 16 streams
# of the Qwen3-4B shape gave 9.1x one stream's tokens a second, 64 streams 22.3x (benchmarks/README.md, session 34).
DEFAULT_MAX_BATCH = {"cpu": 8, "gpu": 16}
DEFAULT_MAX_BODY_MB = 64
DEFAULT_READ_TIMEOUT_S = 60  # a request body that has not all arrived by then gets 408
DEFAULT_KEEPALIVE_TIMEOUT_S = 60  # an idle connection, or one whose headers never end, is closed

MIB = 1 << 20
GIB = 1 << 30
# LLMs: earlier sequences' key/value caches kept for reuse; Ollama's MLX runner evicts past the same 8 GiB.
DEFAULT_PROMPT_CACHE_BYTES = 8 * GIB

T = TypeVar("T")


class SettingsError(ValueError):
    """A flag or environment variable whose value does not parse; the message names it.

    `from_flag` tells the command line's exit code: 2 with usage for a flag, 1 for the environment.
    """

    def __init__(self, message: str, from_flag: bool):
        super().__init__(message)
        self.from_flag = from_flag


@dataclass(frozen=True)
class Settings:
    """How this process runs. Built once by the command line, then passed down as parameters."""

    model: str
    models_dir: str | None = None  # None: $OLLAMA_MODELS or ~/.ollama/models (store.py)
    log_level: int = logging.INFO
    skip_memory_check: bool = False
    memory_limit: int | None = None  # bytes; None leaves MLX's limit as it is
    release_text_encoder: bool = False
    low_memory: bool = False
    denoise_queue_depth: int | None = None  # None: the image pipeline's default
    cpu_dtype: str = DEFAULT_CPU_DTYPE  # one of CPU_DTYPES
    host: str = DEFAULT_HOST
    port: int = 0  # 0 picks a free port
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    max_batch: int | None = None  # 1: LLM requests run one at a time; None: DEFAULT_MAX_BATCH for the backend
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * MIB
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES  # 0: no prompt cache
    # Serve Ollama's current LLM runner protocol (/v1/status, /v1/completions, ...) instead of ours;
    # its parent launches `ollama runner --mlx-engine`. Only an LLM can be served so.
    mlx_engine: bool = False
    read_timeout_s: int = DEFAULT_READ_TIMEOUT_S
    keepalive_timeout_s: int = DEFAULT_KEEPALIVE_TIMEOUT_S
    serve_ui: bool = True  # the web page at / (never under --mlx-engine, whose parent is a program)


# --- value parsers: one per kind of value, shared by flags and environment variables --------------


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (1, true, yes, on or 0, false, no, off), got {text!r}")


def parse_bytes(text: str) -> int:
    """'16GB', '512 MiB', '1000' -> bytes (binary units: a GB here is 2**30, as Ollama prints them)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": MIB, "MB": MIB, "MIB": MIB,
             "G": GIB, "GB": GIB, "GIB": GIB, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a byte size: {text!r} (e.g. 16GB, 512MiB, 1000)") from None
    if unit not in units or value < 0:
        raise ValueError(f"not a byte size: {text!r} (e.g. 16GB, 512MiB, 1000)")
    return int(value * units[unit])


def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"invalid int value: {text!r}") from None  # argparse's own words


def parse_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_int(text)
        if value < lo:
            raise ValueError(f"must be >= {lo}, got {value}")
        return value

    return parse


def parse_port(text: str) -> int:
    value = parse_int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a TCP port (0-65535)")
    return value


def parse_one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected {', '.join(choices[:-1])} or {choices[-1]}, got {text!r}")
        return value

    return parse


parse_cpu_dtype = parse_one_of(CPU_DTYPES)


parse_depth = parse_at_least(0)  # queue depths: 0 is allowed (no waiting requests, no queued blocks)


# --- environment ----------------------------------------------------------------------------------


def env_value(env: Mapping[str, str], name: str, parse: Callable[[str], T]) -> T | None:
    """The variable parsed, or None if it is unset or empty. Trimmed of spaces, then quotes (Ollama's Var)."""
    text = env.get(name, "").strip().strip("\"'")
    if not text:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}", from_flag=False) from None


def cpu_blas_requested(env: Mapping[str, str] = os.environ) -> str:
    """MLXRUNNER_CPU_BLAS: one of CPU_BLAS_CHOICES (mlxrunner/__init__.py routes MLX's products by it)."""
    return env_value(env, ENV_CPU_BLAS, parse_one_of(CPU_BLAS_CHOICES)) or DEFAULT_CPU_BLAS


def ollama_models_env(env: Mapping[str, str] = os.environ) -> str | None:
    """OLLAMA_MODELS, trimmed of whitespace, then quotes (Go's ``envconfig.Var``); None when unset or empty."""
    return env.get(ENV_OLLAMA_MODELS, "").strip().strip("\"'") or None


def ollama_debug_level(env: Mapping[str, str] = os.environ) -> int:
    """OLLAMA_DEBUG as a logging level, read as Ollama reads it (a value it cannot parse means INFO)."""
    return logs.level_from_ollama_debug(env.get(ENV_OLLAMA_DEBUG, "").strip().strip("\"'"))


# --- flags + environment -> Settings ----------------------------------------------------------------


def resolve(flags: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> Settings:
    """Settings from the command line and the environment; a flag given wins over its variable.

    `flags` is the command line as argparse leaves it (`vars(args)`): the text of each option given,
    True for a switch given, None (or no key) for one not given. Raises SettingsError naming the
    flag or variable whose value does not parse.
    """

    def flag(name: str, parse: Callable[[str], T]) -> T | None:
        text = flags.get(name)
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as exc:
            raise SettingsError(f"argument --{name.replace('_', '-')}: {exc}", from_flag=True) from None

    def flag_or_env(name: str, variable: str, parse: Callable[[str], T]) -> T | None:
        value = flag(name, parse)
        return value if value is not None else env_value(env, variable, parse)

    def switch_or_env(name: str, variable: str) -> bool:
        return bool(flags.get(name)) or bool(env_value(env, variable, parse_bool))

    def default(value: T | None, fallback: T) -> T:
        return fallback if value is None else value

    return Settings(
        model=flags["model"],
        models_dir=flags.get("models_dir"),
        log_level=default(flag("log_level", logs.level_from_name), ollama_debug_level(env)),
        skip_memory_check=switch_or_env("skip_memory_check", ENV_SKIP_MEMORY_CHECK),
        memory_limit=env_value(env, ENV_MEMORY_LIMIT, parse_bytes),
        release_text_encoder=switch_or_env("release_text_encoder", ENV_RELEASE_TEXT_ENCODER),
        low_memory=switch_or_env("low_memory", ENV_LOW_MEMORY),
        denoise_queue_depth=flag_or_env("denoise_queue_depth", ENV_DENOISE_QUEUE_DEPTH, parse_depth),
        cpu_dtype=default(flag_or_env("cpu_dtype", ENV_CPU_DTYPE, parse_cpu_dtype), DEFAULT_CPU_DTYPE),
        host=default(flags.get("host"), DEFAULT_HOST),
        port=default(flag("port", parse_port), 0),
        queue_depth=default(flag("queue_depth", parse_depth), DEFAULT_QUEUE_DEPTH),
        max_batch=flag("max_batch", parse_at_least(1)),
        max_body_bytes=default(flag("max_body_mb", parse_at_least(1)), DEFAULT_MAX_BODY_MB) * MIB,
        prompt_cache_bytes=default(flag("prompt_cache_size", parse_bytes), DEFAULT_PROMPT_CACHE_BYTES),
        mlx_engine=bool(flags.get("mlx_engine")),
        read_timeout_s=default(flag("read_timeout", parse_at_least(1)), DEFAULT_READ_TIMEOUT_S),
        keepalive_timeout_s=default(flag("keepalive_timeout", parse_at_least(1)), DEFAULT_KEEPALIVE_TIMEOUT_S),
        serve_ui=not flags.get("no_ui"),
    )
