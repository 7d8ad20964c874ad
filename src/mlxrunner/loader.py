"""Name -> loaded model: resolve, detect, check memory, build the model for its mode.

Runs on the MLX worker thread. `progress(fraction)` reports load progress for /health.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from mlxrunner import backend

mx = backend.import_mlx()  # first: a clear BackendError, not a bare loader message, if MLX cannot start

from mlxrunner import store  # noqa: E402  (imports mlx.core)
from mlxrunner.detect import Detected, Mode, detect  # noqa: E402
from mlxrunner.errors import ModelError  # noqa: E402

log = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20

# Environment switches (flags of the same meaning take precedence in cli.py).
ENV_SKIP_MEMORY_CHECK = "MLXRUNNER_SKIP_MEMORY_CHECK"
ENV_MEMORY_LIMIT = "MLXRUNNER_MEMORY_LIMIT"
# Image models: free the text encoder after each prompt encode (reloaded from the mmap'd weights
# on the next request). Saves its memory (8 GB for Z-Image's Qwen3-4B in bf16) at some time per request.
ENV_RELEASE_TEXT_ENCODER = "MLXRUNNER_RELEASE_TEXT_ENCODER"


@dataclass
class LoadedModel:
    name: str
    detected: Detected
    model: Any  # the mode's model object (embed.bert.BertEmbedder, ...)
    seconds: float

    @property
    def mode(self) -> Mode:
        return self.detected.mode


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


def _human(n: int) -> str:
    # Ollama floors to whole GiB; below 1 GiB that says "0 GB", which helps no one.
    return f"{n // GIB} GB" if n >= GIB else f"{n // MIB} MB"


def check_memory(required: int, mode: Mode) -> None:
    """Refuse to load weights larger than MLX's memory limit (Ollama's runner check, its wording)."""
    available = mx.get_memory_limit()
    if available > 0 and required > 0 and available < required:
        purpose = "image generation" if mode is Mode.IMAGEGEN else f"this {mode.value} model"
        raise ModelError(
            f"insufficient memory for {purpose}: need {_human(required)}, have {_human(available)} "
            f"(set {ENV_SKIP_MEMORY_CHECK}=1 or pass --skip-memory-check to try anyway)")


def apply_memory_limit_from_env() -> None:
    value = os.environ.get(ENV_MEMORY_LIMIT, "").strip().strip("\"'")
    if value:
        mx.set_memory_limit(parse_bytes(value))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().strip("\"'").lower() in ("1", "t", "true", "yes", "on")


def build_model(source, detected: Detected, progress: Callable[[float], None]) -> Any:
    if detected.mode is Mode.EMBEDDING:
        from mlxrunner.embed.bert import BertEmbedder

        return BertEmbedder(source, progress)
    if detected.mode is Mode.LLM:
        from mlxrunner.llm.model import LanguageModel

        return LanguageModel(source, progress)
    from mlxrunner.imagegen import build_pipeline

    return build_pipeline(source, detected.architecture, progress,
                          release_text_encoder=_env_flag(ENV_RELEASE_TEXT_ENCODER))


def load(name: str, progress: Callable[[float], None] = lambda p: None, skip_memory_check: bool = False,
         models_dir: str | None = None) -> LoadedModel:
    start = time.perf_counter()
    source = store.resolve(name, models_dir)
    progress(0.05)
    detected = detect(source)
    log.info("detected model: mode=%s architecture=%s location=%s", detected.mode.value, detected.architecture,
             source.location)
    if not (skip_memory_check or _env_flag(ENV_SKIP_MEMORY_CHECK)):
        check_memory(source.total_tensor_bytes(), detected.mode)
    progress(0.1)
    model = build_model(source, detected, lambda p: progress(0.1 + 0.85 * p))
    progress(1.0)
    seconds = time.perf_counter() - start
    log.info("model loaded in %.2fs", seconds)
    return LoadedModel(name, detected, model, seconds)
