"""What a request may ask for, whichever way it comes (the HTTP protocols, the command line, the Python API): the
bounds on a request (`Limits`, the one place each is written), the LLM sampling options (`Options`,
`parse_options`), and the readers of a JSON object's fields, whose errors name the field at fault.

Only the standard library is imported: the models, the command line and the wire protocols (http/) all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlxrunner.errors import RequestError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for: the one place each bound is written."""

    max_images: int = 4  # reference images per image request
    max_image_side: int = 4096  # pixels, each side of a reference image
    min_image_side: int = 64
    max_output_pixels: int = 2048 * 2048  # width x height of a generated image
    # The step cache's threshold, a relative change of the first block's residual (diffusers' default: 0.05).
    max_cache_threshold: float = 10.0
    # The VAE's tile ("vae_tile", pixels a side): a multiple of 8 latents, so that its 25 % overlap is whole latents.
    vae_tile_multiple: int = 64
    max_vae_tile: int = 2048
    max_steps: int = 200  # denoising steps (transformer evaluations)
    max_embedding_inputs: int = 2048
    max_num_predict: int = 1 << 20


# --- field readers: each names the field in its error -------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_field(body: dict, name: str, lo: int, hi: int, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    # JSON numbers like 512.0 are accepted as integers when they are whole.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value):
        raise RequestError(f'field "{name}" must be an integer, got {json_type(value)}', field=name)
    if not lo <= value <= hi:
        raise RequestError(f'field "{name}" must be between {lo} and {hi}, got {value}', field=name)
    return value


def float_field(body: dict, name: str, lo: float, hi: float, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f'field "{name}" must be a number, got {json_type(value)}', field=name)
    value = float(value)
    if not lo <= value <= hi:
        raise RequestError(f'field "{name}" must be between {lo:g} and {hi:g}, got {value:g}', field=name)
    return value


def str_field(body: dict, name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(f'field "{name}" must be a string, got {json_type(value)}', field=name)
    return checked_text(value, name)


def checked_text(value: str, name: str) -> str:
    """`value` if it can be encoded as UTF-8, else a RequestError naming the field.

    JSON's `\\ud800` escapes decode to lone surrogates, which Python strings hold but no tokenizer
    accepts: refused here, for every text field of every route, rather than deep in a model.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f'field "{name}" holds a lone surrogate (U+{ord(value[exc.start]):04X}) at character '
                           f"{exc.start}; text must be valid Unicode", field=name) from None
    return value


def bool_field(body: dict, name: str, default: bool | None = None) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f'field "{name}" must be true or false, got {json_type(value)}', field=name)
    return value


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass(frozen=True)
class Options:
    """LLM sampling options (`options` in a /completion request). None = the model's default."""

    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> added to its logit (-100..100)


def parse_options(value: Any, limits: Limits) -> Options:
    if value is None:
        return Options()
    if not isinstance(value, dict):
        raise RequestError(f'field "options" must be an object, got {json_type(value)}', field="options")

    def named(name: str) -> dict:
        # Errors name the field as the client wrote it: options.temperature.
        return {f"options.{name}": value.get(name)}

    def int_opt(name: str, lo: int, hi: int) -> int | None:
        return int_field(named(name), f"options.{name}", lo, hi)

    def float_opt(name: str, lo: float, hi: float) -> float | None:
        return float_field(named(name), f"options.{name}", lo, hi)

    stop = value.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError('field "options.stop" must be a list of strings', field="options.stop")
    if any(s == "" for s in stop):
        raise RequestError('field "options.stop" must not contain an empty string', field="options.stop")
    for i, text in enumerate(stop):
        checked_text(text, f"options.stop[{i}]")

    return Options(
        # Ollama's -1 (infinite) and -2 (fill context) mean "until the context is full" here.
        num_predict=int_opt("num_predict", -2, limits.max_num_predict),
        temperature=float_opt("temperature", 0.0, 100.0),
        top_k=int_opt("top_k", 0, 1 << 30),
        top_p=float_opt("top_p", 0.0, 1.0),
        min_p=float_opt("min_p", 0.0, 1.0),
        repeat_penalty=float_opt("repeat_penalty", 0.0, 100.0),
        repeat_last_n=int_opt("repeat_last_n", -1, 1 << 30),
        presence_penalty=float_opt("presence_penalty", -100.0, 100.0),
        frequency_penalty=float_opt("frequency_penalty", -100.0, 100.0),
        seed=int_opt("seed", INT64_MIN, INT64_MAX),
        stop=list(stop),
    )
