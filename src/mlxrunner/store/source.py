"""ModelSource: a model's files and tensors, whatever they are stored in.

**The canonical tensor view.** Whatever the layout on disk, :meth:`ModelSource.tensors` gives
the names Go's loader caches (docs/formats.md): a quantized weight ``X.weight`` (packed ``uint32``)
comes with ``X.weight_scale`` and, for affine modes, ``X.weight_qbias``. Sources of those names:

* Ollama E4 combined blobs: keys ``k``, ``k.scale``, ``k.bias`` -> ``n``, ``n_scale``, ``n_qbias``;
* Ollama E1–E3 separate layers ``X_scale``/``X_qbias`` (blobs keyed ``"data"``): already so;
* mlx-lm folders: ``X.weight``, ``X.scales``, ``X.biases`` -> ``X.weight``, ``X.weight_scale``,
  ``X.weight_qbias``.

An nvfp4 weight may also carry a per-tensor float32 global scale (ModelOpt's ``X.weight_scale_2``; an
Ollama blob's ``X.weight.global_scale``): canonically ``X.weight_global_scale``, meaning the weight is the
dequantized values times it (the C++ Linear scales the matmul's output, as Ollama does).

:meth:`ModelSource.quantization` gives the matching :class:`QuantParams` per quantized weight
(how: :mod:`mlxrunner.store.quant`).

Each subclass turns its layout into a *plan*: canonical name -> :class:`TensorRef` (a file and
the key inside it), built from safetensors headers alone. Loading and quantization work on plans,
so they are shared here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxrunner.errors import ModelError
from mlxrunner.store.quant import (
    QuantHint,
    QuantParams,
    check_global_scale,
    metadata_hints,
    mlx_lm_config_hints,
    model_index_hints,
    resolve_quant,
)
from mlxrunner.store.safetensors import (
    TensorInfo,
    header_metadata,
    load_safetensors,
    read_safetensors_header,
    tensor_infos,
)


@dataclass(frozen=True)
class TensorRef:
    """Where one canonical tensor lives: a safetensors file and the key inside it."""

    path: Path
    key: str
    info: TensorInfo
    metadata: dict  # the file's __metadata__ ({} for none or null)


class ModelSource:
    """A model's files and tensors, whatever they are stored in.

    Subclasses provide ``_plan(component)`` (canonical name -> TensorRef, from headers only);
    loading and quantization are shared.
    """

    name: str  # what the user passed
    location: str  # human description: a directory, or a manifest path

    def __init__(self, name: str, location: str):
        self.name = name
        self.location = location
        self._headers: dict[Path, tuple[dict[str, TensorInfo], dict]] = {}
        self._plans: dict[str, dict[str, TensorRef]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.location!r})"

    # -- files -----------------------------------------------------------------------------
    def has_file(self, relpath: str) -> bool:
        raise NotImplementedError

    def file_path(self, relpath: str) -> Path:
        raise NotImplementedError

    def read_json(self, relpath: str, expect: type = dict) -> Any:
        """A JSON file of the model, parsed; ModelError naming the file if missing, invalid or not an
        `expect` (an object for every config file; sentence-transformers' modules.json is a list)."""
        path = self.file_path(relpath)
        try:
            value = json.loads(path.read_bytes())
        except OSError as e:
            raise ModelError(f"{self.location}: cannot read {relpath} ({path}): {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ModelError(f"{self.location}: {relpath} ({path}) is not valid JSON: {e}") from e
        except ValueError as e:  # an integer literal over Python's 4,300 digits
            raise ModelError(f"{self.location}: {relpath} ({path}) is not acceptable JSON: {e}") from e
        if not isinstance(value, expect):
            wanted = "an object" if expect is dict else "an array"
            raise ModelError(f"{self.location}: {relpath} must hold {wanted}, not {type(value).__name__}")
        return value

    # -- tensors ---------------------------------------------------------------------------
    def tensors(self, component: str = "") -> dict[str, mx.array]:
        """Every tensor of a component, lazily loaded, dtypes as stored, canonical names."""
        loaded: dict[Path, dict[str, mx.array]] = {}
        out = {}
        for name, ref in self._cached_plan(component).items():
            if ref.path not in loaded:  # each file opened once, even if many names share it
                loaded[ref.path] = load_safetensors(ref.path)[0]
            out[name] = loaded[ref.path][ref.key]
        return out

    def quantization(self, component: str = "") -> dict[str, QuantParams]:
        """QuantParams for every quantized weight of a component, from headers and configs."""
        plan = self._cached_plan(component)
        config_hints: list[QuantHint] | None = None
        out = {}
        for name, ref in plan.items():
            if ref.info.dtype != "U32":
                continue
            where = f"{self.location}: tensor {name!r}"
            scale = plan.get(name + "_scale")
            if scale is None:
                if name.endswith(".weight"):  # a packed weight whose scales went missing
                    raise ModelError(f"{where}: a packed {ref.info.dtype} weight without scales")
                continue
            if config_hints is None:
                config_hints = self._config_quant_hints(component)
            hints = metadata_hints(ref.metadata, ref.key, ref.path) + [h for h in config_hints if h.applies_to(name)]
            bias = plan.get(name + "_qbias")
            out[name] = resolve_quant(ref.info, scale.info, bias and bias.info, hints, where)
            global_scale = plan.get(name + "_global_scale")
            if global_scale is not None:
                check_global_scale(out[name], global_scale.info, where)
        return out

    def total_tensor_bytes(self) -> int:
        raise NotImplementedError

    # -- for subclasses --------------------------------------------------------------------
    def _plan(self, component: str) -> dict[str, TensorRef]:
        raise NotImplementedError

    def _config_quant_hints(self, component: str) -> list[QuantHint]:
        """What the configs say: the component's mlx-lm style config.json (also in an Ollama store that
        imported an mlx-lm folder), then model_index.json's type name."""
        config_name = f"{component}/config.json" if component else "config.json"
        hints = []
        if self.has_file(config_name):
            hints += mlx_lm_config_hints(self.read_json(config_name), config_name)
        return hints + self._model_index_quant_hint()

    def _cached_plan(self, component: str) -> dict[str, TensorRef]:
        if component not in self._plans:
            self._plans[component] = _canonical_global_scales(self._plan(component))
        return self._plans[component]

    def _header(self, path: Path) -> tuple[dict[str, TensorInfo], dict]:
        if path not in self._headers:
            header, _ = read_safetensors_header(path)
            self._headers[path] = (tensor_infos(header), header_metadata(header))
        return self._headers[path]

    def _model_index_quant_hint(self) -> list[QuantHint]:
        if not self.has_file("model_index.json"):
            return []
        return model_index_hints(self.read_json("model_index.json"))


# How sources name an nvfp4 weight's global scale (ModelOpt; Ollama's E4 blobs) -> the canonical suffix.
GLOBAL_SCALE_NAMES = (".weight_scale_2", ".weight.global_scale")


def _canonical_global_scales(plan: dict[str, TensorRef]) -> dict[str, TensorRef]:
    out = {}
    for name, ref in plan.items():
        for suffix in GLOBAL_SCALE_NAMES:
            if name.endswith(suffix) and name[: -len(suffix)] + ".weight" in plan:
                name = name[: -len(suffix)] + ".weight_global_scale"
                break
        out[name] = ref
    return out
