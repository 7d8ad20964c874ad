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
hint whose group size disagrees with the shapes is an error. The result is then checked against what
MLX can run (:data:`MLX_MODES`) and against its companions' shapes and dtypes, so a bad checkpoint
fails at load with an error naming the tensor, not deep inside a matmul. This module reads no files:
callers pass parsed metadata and configs, and header entries (:class:`TensorInfo`).
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class ModeSpec:
    """What MLX 0.32.4's quantize/quantized_matmul accept for one mode (docs/formats.md)."""

    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    has_bias: bool  # affine stores a bias per group; the microscaled modes do not
    scale_dtypes: tuple[str, ...]  # safetensors dtypes of the scales


FLOAT_DTYPES = ("F32", "F16", "BF16")
MLX_MODES: dict[str, ModeSpec] = {
    "affine": ModeSpec((1, 2, 3, 4, 5, 6, 8), (32, 64, 128), True, FLOAT_DTYPES),
    "mxfp4": ModeSpec((4,), (32,), False, ("U8", "F8_E8M0")),
    "nvfp4": ModeSpec((4,), (16,), False, ("U8", "F8_E4M3")),
    "mxfp8": ModeSpec((8,), (32,), False, ("U8", "F8_E8M0")),
}
QUANT_MODES = tuple(MLX_MODES)
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
    quantized: bool = True  # False: mlx-lm's `"<module>": false`, the module was left float

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
        source = f"{config_name} quantization[{module!r}]"
        if override is False:
            hints.append(QuantHint(source, module=module, quantized=False))
        elif isinstance(override, dict):
            scoped = _hint_from_mlx_lm(override, source, module)
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
    mode = params.get("mode", "affine")  # checked per tensor (resolve_quant), so the error names one
    if not isinstance(mode, str):
        raise ModelError(f"{source}: mode {mode!r} is not a string")
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


def resolve_quant(weight: TensorInfo, scale: TensorInfo, bias: TensorInfo | None,
                  hints: list[QuantHint], where: str) -> QuantParams:
    """The first hint that names bits wins (else the shapes decide); the result must be something MLX
    runs and must fit the companions. ``where`` names the tensor in errors."""
    params = None
    for hint in hints:
        if not hint.quantized:
            raise ModelError(f"{where}: {hint.source} is false (left unquantized), but the weight is packed "
                             f"{weight.dtype} with scales")
        if hint.bits is not None:
            params = _params_from_hint(hint, weight, scale, where)
            break
    if params is None:
        params = _infer_from_shapes(weight, scale, bias is not None, where)
        check_params(params, where)
        if _group_size_from_shapes(weight, scale, params.bits, where) != params.group_size:
            raise ModelError(f"{where}: cannot tell the quantization from shapes {weight.shape} / {scale.shape}")
    _check_companions(params, weight, scale, bias, where)
    return params


def check_params(params: QuantParams, where: str, source: str = "") -> None:
    """ModelError unless MLX has the mode and it takes these bits and this group size."""
    _check_mode_and_bits(params.mode, params.bits, where, source)
    spec = MLX_MODES[params.mode]
    if params.group_size not in spec.group_sizes:
        raise ModelError(f"{where}: {params.mode} quantization takes group size {_either(spec.group_sizes)}, not "
                         f"{params.group_size}{_said(source)}")


def _check_mode_and_bits(mode: str, bits: int, where: str, source: str) -> None:
    spec = MLX_MODES.get(mode)
    if spec is None:
        raise ModelError(f"{where}: quantization mode {mode!r}{_said(source)} is not one MLX has "
                         f"({', '.join(MLX_MODES)})")
    if bits not in spec.bits:
        raise ModelError(f"{where}: {mode} quantization takes {_either(spec.bits)} bits, not {bits}{_said(source)}")


def _said(source: str) -> str:
    return f" ({source})" if source else ""


def _either(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(values) == 1 else ", ".join(map(str, values[:-1])) + f" or {values[-1]}"


def _params_from_hint(hint: QuantHint, weight: TensorInfo, scale: TensorInfo, where: str) -> QuantParams:
    mode = hint.mode or "affine"
    _check_mode_and_bits(mode, hint.bits, where, hint.source)  # before the shapes: their message would confuse
    from_shapes = _group_size_from_shapes(weight, scale, hint.bits, where)
    if hint.group_size is not None and hint.group_size != from_shapes:
        raise ModelError(
            f"{where}: {hint.source} says group size {hint.group_size}, but the shapes "
            f"{weight.shape} / {scale.shape} give {from_shapes} at {hint.bits} bits")
    params = QuantParams(hint.bits, from_shapes, mode)
    check_params(params, where, hint.source)
    return params


def check_global_scale(params: QuantParams, scale: TensorInfo, where: str) -> None:
    """A global scale (``X.weight_global_scale``) is one float32, and only nvfp4 has one."""
    if params.mode != "nvfp4":
        raise ModelError(f"{where}: a global scale belongs to nvfp4 weights, not {params.mode}")
    if scale.dtype != "F32" or math.prod(scale.shape) != 1:
        raise ModelError(f"{where}: the global scale must be one F32 value, not {scale.dtype} {list(scale.shape)}")


def _check_companions(params: QuantParams, weight: TensorInfo, scale: TensorInfo, bias: TensorInfo | None,
                      where: str) -> None:
    """Scales (and affine biases) cover every row of the weight, in the dtype the mode stores."""
    spec = MLX_MODES[params.mode]
    if len(weight.shape) < 2:
        raise ModelError(f"{where}: a packed weight needs at least 2 dimensions, not shape {weight.shape}")
    if tuple(scale.shape[:-1]) != tuple(weight.shape[:-1]):
        raise ModelError(f"{where}: scales of shape {scale.shape} do not cover the packed weight's "
                         f"{weight.shape} (truncated?)")
    if scale.dtype not in spec.scale_dtypes:
        raise ModelError(f"{where}: {params.mode} scales are {' or '.join(spec.scale_dtypes)}, not {scale.dtype}")
    if spec.has_bias and bias is None:
        raise ModelError(f"{where}: affine quantization needs biases beside the scales; there are none")
    if not spec.has_bias and bias is not None:
        raise ModelError(f"{where}: {params.mode} quantization has no biases, but the weight comes with some")
    if bias is not None and (tuple(bias.shape) != tuple(scale.shape) or bias.dtype != scale.dtype):
        raise ModelError(f"{where}: biases {bias.dtype} {bias.shape} do not match scales {scale.dtype} "
                         f"{scale.shape} (truncated?)")


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
    """columns = packed columns · 32 / bits; group size = columns / scale columns, exactly."""
    packed_cols, scale_cols = weight.shape[-1], scale.shape[-1]
    cols, rem = divmod(packed_cols * 32, bits)
    if rem:
        raise ModelError(f"{where}: {packed_cols} packed uint32 columns do not hold a whole number of "
                         f"{bits}-bit values")
    if scale_cols <= 0 or cols % scale_cols:
        raise ModelError(f"{where}: {cols} columns at {bits} bits do not split into {scale_cols} equal groups "
                         f"(scales {scale.shape}): the group size does not divide the columns")
    return cols // scale_cols
