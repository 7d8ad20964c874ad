"""Name -> loaded model: resolve, detect, check memory, build the model for its mode.

Runs on the MLX worker thread. `progress(fraction)` reports load progress for /health. Every
setting arrives as a parameter (settings.py reads the flags and environment).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Collection

from mlxrunner import backend

mx = backend.import_mlx()  # first: a clear BackendError, not a bare loader message, if MLX cannot start

from mlxrunner import store  # noqa: E402  (imports mlx.core)
from mlxrunner.detect import Detected, Mode, detect  # noqa: E402
from mlxrunner.errors import ModelError  # noqa: E402
from mlxrunner.models import Embedder, ImageModel, LoadedModel, TextModel  # noqa: E402
from mlxrunner.settings import DEFAULT_PROMPT_CACHE_BYTES, ENV_SKIP_MEMORY_CHECK, GIB, MIB  # noqa: E402

log = logging.getLogger(__name__)


MAX_NAME_IN_MESSAGE = 120  # characters of a model name quoted in an error line


def _human(n: int) -> str:
    # Ollama floors to whole GiB; below 1 GiB that says "0 GB", which helps no one, and so would
    # "0 MB" for a limit or a model under 1 MiB.
    if n >= GIB:
        return f"{n // GIB} GB"
    if n >= MIB:
        return f"{n // MIB} MB"
    return f"{n} bytes"


def _shortened(name: str) -> str:
    if len(name) <= MAX_NAME_IN_MESSAGE:
        return repr(name)
    return f"{name[:MAX_NAME_IN_MESSAGE]!r}... ({len(name)} characters)"


def resolve(name: str, models_dir: str | None) -> store.ModelSource:
    """store.resolve, with an OS error (a name too long for a path, say) as one short ModelError line."""
    try:
        return store.resolve(name, models_dir)
    except OSError as exc:
        raise ModelError(f"cannot open model {_shortened(name)}: {exc.strerror or type(exc).__name__}") from None


def predicted_weight_bytes(source: store.ModelSource, detected: Detected, low_memory: bool) -> int:
    """The memory the weights will hold at once, from the files' headers: as stored for a float LLM; a quantized
    LLM's, an image or embedding model's as backend.compute_weights leaves them (bf16 doubled where the CPU upcasts
    it: llm/model.py says why a float LLM is not; an image model's text encoder without the layers past the deepest
    hidden state its pipeline reads); under low_memory an image model's text encoder or transformer, whichever is
    larger, plus the rest."""
    if detected.mode is Mode.LLM:
        if source.quantization(""):
            return backend.computed_bytes(source.tensors(""))
        return source.total_tensor_bytes()
    if detected.mode is Mode.EMBEDDING:
        return backend.computed_bytes(source.tensors(""))
    from mlxrunner.imagegen import pipeline_class
    from mlxrunner.imagegen.text_encoder import encoder_tensors

    text_encoder = encoder_tensors(source, pipeline_class(source, detected.architecture).text_hidden_states)
    sizes = {"text_encoder": backend.computed_bytes(text_encoder),
             **{c: backend.computed_bytes(source.tensors(c)) for c in ("transformer", "vae")}}
    if low_memory:
        return max(sizes["text_encoder"], sizes["transformer"]) + sizes["vae"]
    return sum(sizes.values())


def predicted_peak_bytes(source: store.ModelSource, detected: Detected, low_memory: bool,
                         side: int | None = None) -> int:
    """What the model will hold at its peak: the weights (predicted_weight_bytes), and for an image model the
    phase that needs most beyond them, the VAE decode of a side x side image (default: the default size; the
    denoiser's activations are smaller on every backend measured; benchmarks/README.md)."""
    weights = predicted_weight_bytes(source, detected, low_memory)
    if detected.mode is not Mode.IMAGEGEN:
        return weights
    from mlxrunner.imagegen.pipeline import DEFAULT_SIZE
    from mlxrunner.imagegen.vae import decode_dtype, decode_working_bytes, vae_config

    side = side or DEFAULT_SIZE
    config = vae_config(source.read_json("vae/config.json"), source.location)
    decode = decode_working_bytes(config, side, side, decode_dtype(source.tensors("vae")))
    if low_memory:  # the decode runs with the text encoder and the transformer both freed
        return max(weights, backend.computed_bytes(source.tensors("vae")) + decode)
    return weights + decode


def needs_low_memory(source: store.ModelSource, detected: Detected) -> bool:
    """An image model that fits MLX's memory limit only with its text encoder and transformer held in turn: it
    loads so (with a warning) rather than not at all."""
    limit = mx.get_memory_limit()
    if detected.mode is not Mode.IMAGEGEN or limit <= 0 or predicted_weight_bytes(source, detected, False) <= limit:
        return False
    if predicted_weight_bytes(source, detected, True) > limit:
        return False  # no help: the memory check refuses it either way
    log.warning("the text encoder and the transformer do not fit in memory together (limit %s): loading in "
                "low-memory mode (--low-memory), which reads each again on every request", _human(limit))
    return True


def warn_of_peak(peak: int) -> None:
    """Log an image model's predicted peak; warn when it passes MLX's limit (the weights fit: smaller images
    may work)."""
    limit = mx.get_memory_limit()
    if limit > 0 and peak > limit:
        log.warning("predicted peak memory %.2f GiB (weights and a default-size image) is above the limit of "
                    "%.2f GiB: large images may fail with out of memory", peak / GIB, limit / GIB)
    else:
        log.info("predicted peak memory %.2f GiB", peak / GIB)


def check_memory(required: int, mode: Mode) -> None:
    """Refuse to load weights larger than MLX's memory limit (Ollama's runner check, its wording)."""
    available = mx.get_memory_limit()
    if available > 0 and required > 0 and available < required:
        purpose = "image generation" if mode is Mode.IMAGEGEN else f"this {mode.value} model"
        raise ModelError(
            f"insufficient memory for {purpose}: need {_human(required)}, have {_human(available)} "
            f"(set {ENV_SKIP_MEMORY_CHECK}=1 or pass --skip-memory-check to try anyway)")


def build_model(source: store.ModelSource, detected: Detected, progress: Callable[[float], None], *,
                release_text_encoder: bool = False, low_memory: bool = False,
                denoise_queue_depth: int | None = None,
                prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                max_batch: int | None = None) -> TextModel | Embedder | ImageModel:
    if detected.mode is Mode.EMBEDDING:
        from mlxrunner.embed.bert import BertEmbedder

        return BertEmbedder(source, progress)
    if detected.mode is Mode.LLM:
        from mlxrunner.llm.model import LanguageModel

        return LanguageModel(source, progress, prompt_cache_bytes, max_batch)
    from mlxrunner.imagegen import build_pipeline

    image_options: dict[str, bool | int] = {"release_text_encoder": release_text_encoder, "low_memory": low_memory}
    if denoise_queue_depth is not None:  # else the pipeline's own default
        image_options["denoise_queue_depth"] = denoise_queue_depth
    return build_pipeline(source, detected.architecture, progress, **image_options)


def load(name: str, progress: Callable[[float], None] = lambda p: None, *, models_dir: str | None = None,
         skip_memory_check: bool = False, memory_limit: int | None = None, release_text_encoder: bool = False,
         low_memory: bool = False, denoise_queue_depth: int | None = None,
         prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES, max_batch: int | None = None,
         modes: Collection[Mode] | None = None, warm_up: bool = True) -> LoadedModel:
    """Load `name` (a folder, an Ollama model name or an embedded name; see store.resolve).

    memory_limit (bytes) becomes MLX's memory limit, which the memory check compares the weights
    against; None leaves MLX's limit as it is. `modes`, if given, are the only modes the caller can
    serve: another is a ModelError before any weight is read. `warm_up`: an image model makes a 1-step image
    before load returns (ImageModel.warm_up), so that the first request is as fast as the rest.
    """
    start = time.perf_counter()
    if memory_limit is not None:
        mx.set_memory_limit(memory_limit)
    source = resolve(name, models_dir)
    progress(0.05)
    detected = detect(source)
    log.info("detected model: mode=%s architecture=%s location=%s", detected.mode.value, detected.architecture,
             source.location)
    if modes is not None and detected.mode not in modes:
        allowed = " or ".join(m.value for m in modes)
        raise ModelError(f"{name} is an {detected.mode.value} model ({detected.architecture}); this runner serves "
                         f"only {allowed} models")
    if not skip_memory_check:
        low_memory = low_memory or needs_low_memory(source, detected)
        check_memory(predicted_weight_bytes(source, detected, low_memory), detected.mode)
        if detected.mode is Mode.IMAGEGEN:
            warn_of_peak(predicted_peak_bytes(source, detected, low_memory))
    progress(0.1)
    model = build_model(source, detected, lambda p: progress(0.1 + 0.85 * p),
                        release_text_encoder=release_text_encoder, low_memory=low_memory,
                        denoise_queue_depth=denoise_queue_depth, prompt_cache_bytes=prompt_cache_bytes,
                        max_batch=max_batch)
    if warm_up and detected.mode is Mode.IMAGEGEN:  # before /health says ready
        side, seconds = model.warm_up()
        log.info("warm-up: a %dx%d image in 1 step took %.2fs", side, side, seconds)
    progress(1.0)
    seconds = time.perf_counter() - start
    log.info("model loaded in %.2fs", seconds)
    return LoadedModel(name, detected, model, seconds)
