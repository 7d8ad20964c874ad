"""Broken copies of mlx-lm's quantized fixtures, each with the load error it must give, and the float twin
of a quantized image model.

The broken copies are shared by the store's unit tests (the error from ``ModelSource.quantization``) and
the runner's (``mlxrunner --model BAD`` exits 1 with that error as its ``Error:`` line).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxrunner.store import ModelSource

QUANT_FIXTURES = Path(__file__).parent / "fixtures" / "llm-quant"
Q_PROJ = "model.layers.0.self_attn.q_proj"


def edited_copy(out: Path, folder: Path, config: Callable[[dict], None] | None = None,
                tensors: Callable[[dict], None] | None = None) -> Path:
    """A copy of ``folder`` at ``out`` with ``config(config_dict)`` and ``tensors(tensor_dict)`` applied."""
    shutil.copytree(folder, out)
    (out / "model.safetensors.index.json").unlink()
    if config:
        data = json.loads((out / "config.json").read_text())
        config(data)
        (out / "config.json").write_text(json.dumps(data))
    if tensors:
        weights = mx.load(str(out / "model.safetensors"))
        tensors(weights)
        mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def set_override(module: str, value) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config["quantization"][module] = value
    return edit


def set_global(**params) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config["quantization"].update(params)
    return edit


def replace(**tensors: Callable[[dict], mx.array | None]) -> Callable[[dict], None]:
    """Tensors edits: ``suffix=f(weights)`` sets ``<q_proj>.<suffix>`` to f's result (None deletes it)."""
    def edit(weights: dict) -> None:
        for suffix, make in tensors.items():
            value = make(weights)
            if value is None:
                del weights[f"{Q_PROJ}.{suffix}"]
            else:
                weights[f"{Q_PROJ}.{suffix}"] = value
    return edit


@dataclass(frozen=True)
class BadCase:
    fixture: str
    expected: tuple[str, ...]  # substrings of the error, after the tensor's name
    config: Callable[[dict], None] | None = None
    tensors: Callable[[dict], None] | None = None
    tensor: str = f"{Q_PROJ}.weight"

    def build(self, out: Path) -> Path:
        return edited_copy(out, QUANT_FIXTURES / self.fixture, self.config, self.tensors)


BAD_CASES: dict[str, BadCase] = {
    "truncated-scales": BadCase("qwen3-tiny-q4-g64", ("do not cover", "truncated"),
                                tensors=replace(scales=lambda w: w[f"{Q_PROJ}.scales"][:40])),
    "truncated-biases": BadCase("qwen3-tiny-q4-g64", ("biases", "truncated"),
                                tensors=replace(biases=lambda w: w[f"{Q_PROJ}.biases"][:40])),
    # 64 columns cannot be split into 3 groups.
    "group-does-not-divide": BadCase("qwen3-tiny-q4-g64", ("group size does not divide the columns",),
                                     tensors=replace(scales=lambda w: mx.zeros((64, 3)),
                                                     biases=lambda w: mx.zeros((64, 3)))),
    # Affine with group size 16: MLX 0.32.4 refuses it.
    "group-mlx-lacks": BadCase("qwen3-tiny-q4-g64", ("takes group size 32, 64 or 128, not 16",),
                               config=set_override(Q_PROJ, {"group_size": 16, "bits": 4}),
                               tensors=replace(scales=lambda w: mx.zeros((64, 4)), biases=lambda w: mx.zeros((64, 4)))),
    "mode-mlx-lacks": BadCase("qwen3-tiny-q4-g64", ("mode 'fp8'", "not one MLX has"),
                              config=set_override(Q_PROJ, {"group_size": 64, "bits": 4, "mode": "fp8"})),
    # The first packed weight (sorted names) is the embedding.
    "3-bits-mxfp4": BadCase("qwen3-tiny-mxfp4", ("mxfp4 quantization takes 4 bits, not 3",),
                            config=set_global(bits=3), tensor="model.embed_tokens.weight"),
    "false-but-packed": BadCase("qwen3-tiny-q4-g64", ("is false",), config=set_override(Q_PROJ, False)),
    "affine-without-biases": BadCase("qwen3-tiny-q4-g64", ("needs biases",), tensors=replace(biases=lambda w: None)),
    "packed-without-scales": BadCase("qwen3-tiny-q4-g64", ("without scales",),
                                     tensors=replace(scales=lambda w: None, biases=lambda w: None)),
    "float-scales-mxfp8": BadCase("qwen3-tiny-mxfp8", ("mxfp8 scales are U8",),
                                  tensors=replace(scales=lambda w: w[f"{Q_PROJ}.scales"].astype(mx.float32))),
}


def dequantized_image_folder(source: ModelSource, fixture: Path, out: Path,
                             components: tuple[str, ...] = ("text_encoder", "transformer")) -> Path:
    """``fixture`` (a float diffusers folder) with ``components`` replaced by ``source``'s tensors (canonical
    names), every packed weight dequantized exactly (in its scales' dtype when they are float, else float32):
    the float model a quantized one must match."""
    shutil.copytree(fixture, out)
    for component in components:
        tensors, params = source.tensors(component), source.quantization(component)
        weights = {}
        for key, value in tensors.items():
            if key.endswith(("_scale", "_qbias")):
                continue
            p, scales = params.get(key), tensors.get(key + "_scale")
            weights[key] = value if p is None else mx.dequantize(
                value, scales, tensors.get(key + "_qbias"), group_size=p.group_size, bits=p.bits, mode=p.mode,
                dtype=scales.dtype if mx.issubdtype(scales.dtype, mx.floating) else mx.float32)
        for old in (out / component).glob("*.safetensors*"):
            old.unlink()
        mx.save_safetensors(str(out / component / "model.safetensors"), weights)
    return out
