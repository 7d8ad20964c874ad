"""Quantization metadata: how a packed ``uint32`` weight was quantized (docs/formats.md).

A quantized weight ``X.weight`` comes with ``X.weight_scale`` and, for affine modes,
``X.weight_qbias``; :func:`resolve_quant` gives its :class:`QuantParams` (the arguments of
``mx.dequantize``). What the sources of a model say about it are :class:`QuantHint` s, tried in
this order (first one naming the bits wins):

1. the tensor's own metadata (``<key>.quant_type``), then the blob's ``quant_type``
   (:func:`metadata_hints`);
2. the model's config: mlx-lm's ``config.json`` ``quantization`` (:func:`mlx_lm_config_hints`,
   per-module overrides before the global parameters), then ``model_index.json``
   ``quantization`` (:func:`model_index_hints`);
3. no hint: the shapes alone (Go's heuristic, without its MXFP8 bug).

Mode and bits come from the type name; the group size from the hint, else from the shapes, and a
hint whose group size disagrees with the shapes is an error. This module reads no files: callers
pass parsed metadata and configs, and header entries (:class:`TensorInfo`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mlxrunner.errors import ModelError
from mlxrunner.store.safetensors import TensorInfo


@dataclass(frozen=True)
class QuantParams:
    """How one packed ``uint32`` weight was quantized; the arguments of ``mx.dequantize``."""

    bits: int
    group_size: int
    mode: str  # "affine" | "nvfp4" | "mxfp8" | "mxfp4"

    @property
    def has_bias(self) -> bool:
        return self.mode == "affine"


# Type name (upper-cased) -> (bits, mode), as docs/formats.md lists them. The group size always
# comes from metadata or from the shapes, never from this table.
QUANT_TYPES: dict[str, tuple[int, str]] = {
    "FP8": (8, "affine"),
    "FP4": (4, "affine"),
    "Q4": (4, "affine"),
    "INT4": (4, "affine"),
    "Q8": (8, "affine"),
    "INT8": (8, "affine"),
    "NVFP4": (4, "nvfp4"),
    "MXFP8": (8, "mxfp8"),
    "MXFP4": (4, "mxfp4"),
}
QUANT_MODES = ("affine", "nvfp4", "mxfp8", "mxfp4")
# Names that mean "not quantized" (model_index.json carries the source dtype when unquantized).
UNQUANTIZED_TYPES = {"", "BF16", "BFLOAT16", "F16", "FP16", "FLOAT16", "F32", "FP32", "FLOAT32"}


@dataclass(frozen=True)
class QuantHint:
    """What one source (metadata, a config file) says about a tensor's quantization."""

    source: str  # for error messages
    bits: int | None = None
    mode: str | None = None
    group_size: int | None = None
    module: str | None = None  # mlx-lm per-module override: applies to "<module>.weight" only

    def applies_to(self, name: str) -> bool:
        return self.module is None or name == f"{self.module}.weight"


# -- hints from each source ---------------------------------------------------------------------


def metadata_hints(metadata: dict, key: str, path: str | os.PathLike) -> list[QuantHint]:
    """From the ``__metadata__`` of safetensors file ``path``: tensor ``key``'s own ``<key>.quant_type``,
    then the file's ``quant_type``."""
    where = f"{path}: __metadata__"
    hints = [
        _hint_from_type_name(metadata.get(f"{key}.quant_type"), metadata.get(f"{key}.group_size"), where,
                             strict=True),
        _hint_from_type_name(metadata.get("quant_type"), metadata.get("group_size"), where, strict=True),
    ]
    return [h for h in hints if h]


def model_index_hints(index: object) -> list[QuantHint]:
    """From a parsed ``model_index.json``: its ``quantization`` type name, if it names one."""
    value = index.get("quantization") if isinstance(index, dict) else None
    hint = _hint_from_type_name(value, None, "model_index.json quantization", strict=False)
    return [hint] if hint else []


def mlx_lm_config_hints(config: object, config_name: str) -> list[QuantHint]:
    """From a parsed mlx-lm ``config.json``: per-module overrides first, then the global parameters."""
    if not isinstance(config, dict):
        return []
    params = config.get("quantization")
    if params is None:
        params = config.get("quantization_config")
        if isinstance(params, dict) and "quant_method" in params:  # GPTQ/AWQ/FP8: not MLX's layout
            return []
    if isinstance(params, str):
        hint = _hint_from_type_name(params, None, f"{config_name} quantization", strict=False)
        return [hint] if hint else []
    if not isinstance(params, dict):
        return []
    hints = []
    for module, override in params.items():
        if isinstance(override, dict):
            scoped = _hint_from_mlx_lm(override, f"{config_name} quantization[{module!r}]", module)
            if scoped:
                hints.append(scoped)
    general = _hint_from_mlx_lm(params, f"{config_name} quantization")
    return hints + ([general] if general else [])


def _hint_from_type_name(type_name: object, group_size: object, source: str, strict: bool) -> QuantHint | None:
    """A hint from a quant type name such as "int8"; None for unquantized markers ("BF16", "")."""
    if not isinstance(type_name, str) or type_name.upper() in UNQUANTIZED_TYPES:
        return None
    known = QUANT_TYPES.get(type_name.upper())
    if known is None:
        if strict:
            raise ModelError(f"{source}: unknown quantization type {type_name!r} (known: {', '.join(QUANT_TYPES)})")
        return None  # model_index.json says e.g. "bfloat16" for unquantized models
    bits, mode = known
    return QuantHint(source, bits, mode, _parse_group_size(group_size, source))


def _hint_from_mlx_lm(params: object, source: str, module: str | None = None) -> QuantHint | None:
    """mlx-lm's config.json ``quantization`` object: {"group_size", "bits", "mode"?}."""
    if not isinstance(params, dict) or "bits" not in params:
        return None
    mode = params.get("mode", "affine")
    if mode not in QUANT_MODES:
        raise ModelError(f"{source}: unknown quantization mode {mode!r} (known: {', '.join(QUANT_MODES)})")
    bits = params["bits"]
    if not isinstance(bits, int) or isinstance(bits, bool) or bits <= 0:
        raise ModelError(f"{source}: bits {bits!r} is not a positive integer")
    return QuantHint(source, bits, mode, _parse_group_size(params.get("group_size"), source), module)


def _parse_group_size(value: object, source: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        group_size = int(value)  # Ollama writes it as a decimal string
    except (TypeError, ValueError):
        raise ModelError(f"{source}: group_size {value!r} is not an integer") from None
    if group_size <= 0:
        raise ModelError(f"{source}: group_size {value!r} is not positive")
    return group_size


# -- hints + shapes -> QuantParams ----------------------------------------------------------------


def resolve_quant(weight: TensorInfo, scale: TensorInfo, has_bias: bool,
                  hints: list[QuantHint], where: str) -> QuantParams:
    """The first hint that names bits wins; its group size must agree with the shapes."""
    for hint in hints:
        if hint.bits is None:
            continue
        from_shapes = _group_size_from_shapes(weight, scale, hint.bits, where)
        if hint.group_size is not None and hint.group_size != from_shapes:
            raise ModelError(
                f"{where}: {hint.source} says group size {hint.group_size}, but the shapes "
                f"{weight.shape} / {scale.shape} give {from_shapes} at {hint.bits} bits")
        return QuantParams(hint.bits, from_shapes, hint.mode or "affine")
    return _infer_from_shapes(weight, scale, has_bias, where)


def _infer_from_shapes(weight: TensorInfo, scale: TensorInfo, has_bias: bool, where: str) -> QuantParams:
    """No metadata anywhere: Go's shape heuristic (docs/formats.md), without its MXFP8 bug.

    Microscaled modes have uint8 scales and no bias; their group sizes are fixed (nvfp4 16,
    mx* 32), which tells 4 from 8 bits.
    """
    packed_cols, scale_cols = weight.shape[-1], scale.shape[-1]
    gs4, gs8 = packed_cols * 8 // max(scale_cols, 1), packed_cols * 4 // max(scale_cols, 1)
    if not has_bias and scale.dtype in ("U8", "F8_E4M3", "F8_E8M0"):
        if gs4 == 16:
            return QuantParams(4, 16, "nvfp4")
        if gs4 == 32:
            return QuantParams(4, 32, "mxfp4")
        if gs8 == 32:
            return QuantParams(8, 32, "mxfp8")
        raise ModelError(f"{where}: cannot tell the quantization from shapes {weight.shape} / {scale.shape}")
    if gs4 == 32:
        return QuantParams(4, 32, "affine")
    if gs8 == 64:
        return QuantParams(8, 64, "affine")
    return QuantParams(4, 64, "affine")  # Go's choice for the ambiguous (64, 32) case without a type


def _group_size_from_shapes(weight: TensorInfo, scale: TensorInfo, bits: int, where: str) -> int:
    packed_cols, scale_cols = weight.shape[-1], scale.shape[-1]
    cols, rem = divmod(packed_cols * 32, bits)
    if rem or scale_cols <= 0 or cols % scale_cols:
        raise ModelError(
            f"{where}: {bits}-bit packed shape {weight.shape} does not match scale shape {scale.shape}")
    return cols // scale_cols
