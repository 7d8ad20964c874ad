"""Build Ollama model stores in a temp dir, byte for byte as ``ollama create`` wrote them.

The layout is described in docs/formats.md (Ollama stores). This helper is independent of
``mlxrunner`` on purpose (its own safetensors writer and header reader), so a bug in the loader
cannot cancel out against the same bug here.

Two writers, as in Ollama:

* :func:`go_safetensors` — Go ``x/safetensors``: keys sorted, per tensor
  ``dtype, shape, data_offsets``, compact, header padded with spaces to a multiple of 8.
  Used for every unquantized blob.
* :func:`mlx_safetensors` — MLX's own ``mx.save_safetensors`` (the real writer):
  ``"__metadata__"`` always present (``null`` without metadata), no padding. Used for every
  quantized blob.

Layouts, by era (``key=`` / ``layout=`` below):

* E0–E3 unquantized: a blob per tensor keyed ``"data"``;
* E1–E3 quantized: separate layers ``X``, ``X_scale``, ``X_qbias``, each keyed ``"data"``,
  metadata ``null``; the type is in ``model_index.json`` ``quantization``;
* E4 unquantized: keyed by the bare tensor name (component stripped);
* E4 quantized: one blob keyed ``<full name>``, ``.scale``, ``.bias`` with
  ``{"group_size": "<gs>", "quant_type": "<type>"}``.

Typical use::

    manifest = build_store(tmp, "x/z-image-turbo:latest",
                           files={"model_index.json": {"architecture": "ZImagePipeline"}},
                           tensors={"transformer/a.weight": w}, quantize={"transformer/a.weight"})

or, for mixed eras, a :class:`StoreBuilder` and its ``add_*`` methods.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
GGUF_MEDIA_TYPE = "application/vnd.ollama.image.model"

# quant type as the user typed it -> (group size, bits, MLX mode) at the time it was written.
QUANT_SPECS: dict[str, tuple[int, int, str]] = {
    "fp8": (32, 8, "affine"),  # E1-E2
    "fp4": (32, 4, "affine"),  # E2
    "q4": (32, 4, "affine"),  # E3
    "q8": (64, 8, "affine"),  # E3
    "int4": (64, 4, "affine"),  # E4 after 03-06
    "int8": (64, 8, "affine"),
    "nvfp4": (16, 4, "nvfp4"),
    "mxfp8": (32, 8, "mxfp8"),
    "mxfp4": (32, 4, "mxfp4"),
}

_NUMPY_DTYPES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32", np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_MLX_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int64: "I64", mx.int32: "I32",
    mx.int16: "I16", mx.int8: "I8", mx.uint64: "U64", mx.uint32: "U32", mx.uint16: "U16", mx.uint8: "U8",
    mx.bool_: "BOOL",
}


@dataclass(frozen=True)
class RawTensor:
    """A tensor as a safetensors writer sees it: dtype string, shape, raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def raw_tensor(value) -> RawTensor:
    """np.ndarray, mx.array (bf16 too) or RawTensor -> RawTensor."""
    if isinstance(value, RawTensor):
        return value
    if isinstance(value, mx.array):
        dtype = _MLX_DTYPES[value.dtype]
        as_numpy = np.array(value.view(mx.uint16)) if value.dtype == mx.bfloat16 else np.array(value)
        return RawTensor(dtype, tuple(value.shape), np.ascontiguousarray(as_numpy).tobytes())
    value = np.ascontiguousarray(value)
    return RawTensor(_NUMPY_DTYPES[value.dtype], tuple(value.shape), value.tobytes())


def to_mlx(value) -> mx.array:
    if isinstance(value, mx.array):
        return value
    if isinstance(value, RawTensor):
        return to_mlx_raw(value)
    return mx.array(np.asarray(value))


def to_mlx_raw(raw: RawTensor) -> mx.array:
    if raw.dtype == "BF16":
        bits = np.frombuffer(raw.data, dtype=np.uint16).reshape(raw.shape)
        return mx.array(bits).view(mx.bfloat16)
    np_dtype = next(d for d, name in _NUMPY_DTYPES.items() if name == raw.dtype)
    return mx.array(np.frombuffer(raw.data, dtype=np_dtype).reshape(raw.shape))


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def go_safetensors(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """Go ``x/safetensors`` bytes: data in input order, header keys sorted, space padded."""
    header: dict[str, object] = {}
    data = bytearray()
    for name, value in tensors.items():
        raw = raw_tensor(value)
        header[name] = {"dtype": raw.dtype, "shape": list(raw.shape),
                        "data_offsets": [len(data), len(data) + len(raw.data)]}
        data += raw.data
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(data)


def mlx_safetensors(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """Bytes from MLX's real writer (``mx.save_safetensors``)."""
    arrays = {name: to_mlx(value) for name, value in tensors.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob.safetensors")
        if metadata is None:
            mx.save_safetensors(path, arrays)
        else:
            mx.save_safetensors(path, arrays, metadata)
        return Path(path).read_bytes()


def read_header(data: bytes) -> dict:
    """Minimal safetensors header reader (for tests and :func:`import_directory`)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def tensors_of_file(path: Path) -> dict[str, RawTensor]:
    """Every tensor of a safetensors file, raw bytes copied verbatim, sorted by name."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        begin, end = entry["data_offsets"]
        out[name] = RawTensor(entry["dtype"], tuple(entry["shape"]), data[8 + n + begin:8 + n + end])
    return out


def quantize(value, quant_type: str) -> tuple[mx.array, mx.array, mx.array | None]:
    """MLX quantization as Ollama's create did it: non-float sources are cast to bf16 first."""
    group_size, bits, mode = QUANT_SPECS[quant_type.lower()]
    w = to_mlx(value)
    if w.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        w = w.astype(mx.bfloat16)
    parts = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    wq, scales = parts[0], parts[1]
    biases = parts[2] if mode == "affine" else None
    mx.eval(wq, scales, *([biases] if biases is not None else []))
    return wq, scales, biases


def go_model_index(index: dict) -> bytes:
    """``json.MarshalIndent(m, "", "    ")``: sorted keys, 4 spaces, no trailing newline."""
    return json.dumps(index, indent=4, sort_keys=True, ensure_ascii=False).encode()


def normalise_model_index(index: dict, parameter_count: int | None = None,
                          quantization: str | None = None) -> dict:
    """What ``ollama create`` did to a diffusers ``model_index.json`` (docs/formats.md)."""
    out = dict(index)
    if "_class_name" in out:
        out["architecture"] = out.pop("_class_name")
    out.pop("_diffusers_version", None)
    if parameter_count is not None:
        out["parameter_count"] = parameter_count
    if quantization is not None:
        out["quantization"] = quantization
    return out


def config_v2(capabilities=("image",), file_type: str = "", requires: str = "0.19.0") -> bytes:
    """The ConfigV2 blob (docs/formats.md), in Go's field order, no trailing newline."""
    config = {"model_format": "safetensors", "model_family": "", "model_families": None, "model_type": "",
              "file_type": file_type, "requires": requires, "capabilities": list(capabilities),
              "architecture": "", "os": "", "rootfs": {"type": "", "diff_ids": None}}
    return json.dumps(config, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def _manifest_relpath(name: str) -> Path:
    """Parent-side ParseName(...).Filepath(), enough for test names."""
    host, namespace, tag = "registry.ollama.ai", "library", "latest"
    last_colon, last_slash = name.rfind(":"), name.rfind("/")
    if last_colon > last_slash:
        name, tag = name[:last_colon], name[last_colon + 1:]
    parts = name.split("/")
    host, namespace, model = [host, namespace][: 3 - len(parts)] + parts
    return Path(host, namespace, model, tag)


class StoreBuilder:
    """Writes blobs into ``<root>/blobs`` and collects layers; :meth:`write_manifest` ends it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        self.layers: list[dict] = []

    # -- blobs and layers ------------------------------------------------------------------
    def add_blob(self, data: bytes, *, colon_name: bool = False) -> tuple[str, int, Path]:
        """Write a blob under its digest; ``colon_name`` uses the very old ``sha256:<hex>`` name."""
        hex_digest = hashlib.sha256(data).hexdigest()
        path = self.blobs / (f"sha256:{hex_digest}" if colon_name else f"sha256-{hex_digest}")
        path.write_bytes(data)
        return f"sha256:{hex_digest}", len(data), path

    def add_layer(self, media_type: str, data: bytes, name: str | None, *, colon_name: bool = False) -> dict:
        digest, size, _ = self.add_blob(data, colon_name=colon_name)
        layer = {"mediaType": media_type, "digest": digest, "size": size}
        if name:
            layer["name"] = name
        self.layers.append(layer)
        return layer

    def add_tensor(self, name: str, value, *, key: str = "bare", colon_name: bool = False) -> dict:
        """One unquantized tensor, Go writer. ``key``: "bare" (E4: name without its component),
        "data" (E0–E3), "full" (the layer name), or any literal key."""
        blob_key = {"bare": name.split("/", 1)[-1], "data": "data", "full": name}.get(key, key)
        return self.add_layer(TENSOR_MEDIA_TYPE, go_safetensors({blob_key: value}), name, colon_name=colon_name)

    def add_quantized(self, name: str, value, quant_type: str = "int8", *, layout: str = "combined",
                      global_scale: float | None = None) -> list[dict]:
        """A quantized weight. ``combined`` = E4 blob ``name``/``.scale``/``.bias`` + metadata, and
        ``.global_scale`` (an nvfp4 weight's per-tensor F32 factor, as Ollama's linear factory reads it) when
        given; ``separate`` = E1–E3 layers ``name``, ``name_scale``, ``name_qbias`` keyed "data"."""
        wq, scales, biases = quantize(value, quant_type)
        if layout == "combined":
            group_size = QUANT_SPECS[quant_type.lower()][0]
            tensors = {name: wq, name + ".scale": scales}
            if biases is not None:
                tensors[name + ".bias"] = biases
            if global_scale is not None:
                tensors[name + ".global_scale"] = mx.array(global_scale, dtype=mx.float32)
            metadata = {"quant_type": quant_type, "group_size": str(group_size)}
            return [self.add_layer(TENSOR_MEDIA_TYPE, mlx_safetensors(tensors, metadata), name)]
        if layout != "separate":
            raise ValueError(layout)
        parts = {name: wq, name + "_scale": scales}
        if biases is not None:
            parts[name + "_qbias"] = biases
        return [self.add_layer(TENSOR_MEDIA_TYPE, mlx_safetensors({"data": v}), n) for n, v in parts.items()]

    def add_packed(self, name: str, tensors: dict, *, metadata: dict | None = None, writer: str = "go") -> dict:
        """A packed group blob (E4 LLM experts) named by its group prefix."""
        data = go_safetensors(tensors, metadata) if writer == "go" else mlx_safetensors(tensors, metadata)
        return self.add_layer(TENSOR_MEDIA_TYPE, data, name)

    def add_json(self, relpath: str, content: bytes | dict | list) -> dict:
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        return self.add_layer(JSON_MEDIA_TYPE, data, relpath)

    # -- manifest --------------------------------------------------------------------------
    def write_manifest(self, name: str, *, pretty: bool = False, config: bytes | None = None) -> Path:
        """Compact JSON + newline like ``json.NewEncoder``; ``pretty`` = a pulled manifest:
        indented and with fields the runner does not know."""
        cfg_digest, cfg_size, _ = self.add_blob(config if config is not None else config_v2())
        manifest: dict = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
                          "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": cfg_digest, "size": cfg_size},
                          "layers": self.layers}
        if pretty:
            manifest = _with_unknown_fields(manifest)
            text = json.dumps(manifest, indent=3) + "\n"
        else:
            text = json.dumps(manifest, separators=(",", ":")) + "\n"
        path = self.root / "manifests" / _manifest_relpath(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def _with_unknown_fields(manifest: dict) -> dict:
    layers = [{**layer, "from": "/old/path", "urls": [], "annotations": {"x": "y"}, "dtype": "BF16", "shape": [1]}
              for layer in manifest["layers"]]
    return {"annotations": {"org.opencontainers.image.created": "2026-01-01"}, **manifest, "layers": layers,
            "subject": None}


def build_store(root: str | os.PathLike, name: str, files: dict[str, bytes | dict] | None = None,
                tensors: dict | None = None, *, era: str = "e4", quantize: set[str] | None = None,
                quant_type: str | None = None, colon_blobs: set[str] = frozenset(),
                pretty: bool = False) -> Path:
    """A whole model in one call; returns the manifest path.

    ``tensors`` maps ``component/tensor`` (or a bare LLM name) to an array. ``era``: "e0"
    (keys "data", no quantization), "e1"/"e3" (keys "data", quantized as separate layers, type
    in ``model_index.json``), "e4" (bare keys, combined quantized blobs). ``files`` become JSON
    layers (dicts as compact JSON, bytes verbatim); with legacy quantization a dict
    ``model_index.json`` gets ``quantization`` added. ``colon_blobs`` names tensors whose blob
    is stored under the old ``sha256:<hex>`` file name.
    """
    era = era.lower()
    quantize = set(quantize or ())
    quant_type = quant_type or {"e1": "fp8", "e3": "q8"}.get(era, "int8")
    if era == "e0" and quantize:
        raise ValueError("E0 had no quantization")
    builder = StoreBuilder(root)
    for tensor_name, value in (tensors or {}).items():
        if tensor_name in quantize:
            builder.add_quantized(tensor_name, value, quant_type, layout="combined" if era == "e4" else "separate")
        else:
            builder.add_tensor(tensor_name, value, key="bare" if era == "e4" else "data",
                               colon_name=tensor_name in colon_blobs)
    for relpath, content in (files or {}).items():
        if relpath == "model_index.json" and isinstance(content, dict) and quantize and era in ("e1", "e3"):
            content = {**content, "quantization": content.get("quantization", quant_type.upper())}
        builder.add_json(relpath, content)
    file_type = quant_type.lower() if quantize and era == "e4" else ""
    return builder.write_manifest(name, pretty=pretty, config=config_v2(file_type=file_type))


def import_directory(root: str | os.PathLike, name: str, source_dir: str | os.PathLike, *, era: str = "e4",
                     quantize: set[str] | None = None, quant_type: str = "int8",
                     normalise_index: bool = True) -> Path:
    """Copy an HF or diffusers folder into a store, the way ``ollama create`` laid it out.

    Every tensor of a top-level ``*.safetensors`` becomes a layer with its bare name; of
    ``<component>/*.safetensors`` a layer ``<component>/<tensor>``. Tensor bytes are copied
    verbatim. Every JSON file (except ``*.safetensors.index.json``) becomes a JSON layer named by
    its relative path; ``model_index.json`` is normalised like Go did unless told otherwise.
    """
    source_dir = Path(source_dir)
    era = era.lower()
    quantize = set(quantize or ())
    builder = StoreBuilder(root)
    parameters = 0
    for path in sorted(source_dir.glob("*.safetensors")) + sorted(source_dir.glob("*/*.safetensors")):
        component = path.parent.relative_to(source_dir).as_posix()
        for tensor, raw in tensors_of_file(path).items():
            layer_name = tensor if component == "." else f"{component}/{tensor}"
            parameters += int(np.prod(raw.shape))
            if layer_name in quantize:
                builder.add_quantized(layer_name, raw, quant_type,
                                      layout="combined" if era == "e4" else "separate")
            else:
                builder.add_tensor(layer_name, raw, key="bare" if era == "e4" else "data")
    for path in sorted(source_dir.rglob("*.json")):
        relpath = path.relative_to(source_dir).as_posix()
        if relpath.endswith(".safetensors.index.json"):
            continue
        content = path.read_bytes()
        if relpath == "model_index.json" and normalise_index:
            quantization = quant_type.upper() if quantize else None
            index = normalise_model_index(json.loads(content), parameters if era != "e0" else None,
                                          quantization if era != "e0" else None)
            content = go_model_index(index)
        builder.add_json(relpath, content)
    return builder.write_manifest(name)


def image_quantization_names(source_dir: str | os.PathLike, quant_type: str) -> set[str]:
    """The layers ``ollama create --experimental -q TYPE`` quantized in a diffusers folder (docs/formats.md):
    not the VAE; ``.weight`` tensors of at least 2 dimensions whose names hold no ``embed``, ``norm``, ``ln_``
    or ``layernorm``; the last dimension a multiple of the group size. (Go checked int4 against 32 while
    quantizing at 64, and failed on such tensors; this takes the group size it quantizes with.)"""
    source_dir = Path(source_dir)
    group_size = QUANT_SPECS[quant_type.lower()][0]
    names = set()
    for path in sorted(source_dir.glob("*/*.safetensors")):
        component = path.parent.name
        if component == "vae":
            continue
        for tensor, raw in tensors_of_file(path).items():
            skipped = any(part in tensor for part in ("embed", "norm", "ln_", "layernorm"))
            if not skipped and tensor.endswith(".weight") and len(raw.shape) >= 2 and raw.shape[-1] % group_size == 0:
                names.add(f"{component}/{tensor}")
    return names


# Ollama's x/create policy for LLMs (docs/formats.md): which type each tensor gets.
EIGHT_BIT = {"int4": "int8", "int8": "int8", "nvfp4": "mxfp8", "mxfp4": "mxfp8", "mxfp8": "mxfp8"}
ALIGNMENT = {"nvfp4": 16, "int4": 64, "int8": 64}  # else 32


def llm_tensor_quantization(name: str, shape: tuple[int, ...], quant_type: str) -> str:
    """GetTensorQuantization: "" keeps the tensor at source precision."""
    def aligned(kind: str) -> bool:
        return shape[-1] % ALIGNMENT.get(kind, 32) == 0

    skipped = ("embed" in name or "norm" in name or "ln_" in name or "layernorm" in name
               or name.endswith(".mlp.gate.weight")  # a MoE router
               or not name.endswith(".weight") or len(shape) != 2 or int(np.prod(shape)) < 1024)
    if skipped:
        return ""
    eight = EIGHT_BIT[quant_type]
    if name.endswith("lm_head.weight"):
        return eight if aligned(eight) else ""
    if not aligned(quant_type):
        return ""
    sensitive = ".v_proj" in name or ".k_proj" in name or "down_proj" in name
    if quant_type in ("int4", "nvfp4", "mxfp4") and sensitive and aligned(eight):
        return eight
    return quant_type


def expert_group(name: str) -> str | None:
    """The packed layer a MoE tensor goes into: ``model.layers.{L}.mlp.experts`` or ``…shared_experts``."""
    for group in (".mlp.experts.", ".mlp.shared_experts."):
        if group in name:
            return name[:name.index(group) + len(group) - 1]
    return None


def add_packed_group(builder: StoreBuilder, group: str, tensors: dict, quant_type: str,
                     global_scales: dict[str, float]) -> None:
    """One packed blob for a layer's experts: each tensor under its full name, a quantized one with its
    ``.scale`` / ``.bias`` (and nvfp4's ``.global_scale``) companions and per-tensor ``quant_type`` /
    ``group_size`` metadata."""
    packed, metadata = {}, {}
    for tensor, raw in tensors.items():
        kind = llm_tensor_quantization(tensor, raw.shape, quant_type) if quant_type else ""
        if not kind:
            packed[tensor] = raw
            continue
        wq, scales, biases = quantize(raw, kind)
        packed.update({tensor: wq, tensor + ".scale": scales})
        if biases is not None:
            packed[tensor + ".bias"] = biases
        if tensor in global_scales:
            packed[tensor + ".global_scale"] = mx.array(global_scales[tensor], dtype=mx.float32)
        metadata.update({f"{tensor}.quant_type": kind, f"{tensor}.group_size": str(QUANT_SPECS[kind][0])})
    builder.add_packed(group, packed, metadata=metadata or None, writer="mlx" if metadata else "go")


def create_llm(root: str | os.PathLike, name: str, source_dir: str | os.PathLike, quant_type: str = "",
               global_scales: dict[str, float] | None = None) -> Path:
    """An HF LLM folder imported the way Ollama's x/create does: one layer per tensor named by the
    tensor, quantized per :func:`llm_tensor_quantization` into combined E4 blobs (``global_scales``: tensor
    name -> an nvfp4 weight's global scale, stored beside it), except MoE experts: one packed layer per
    layer's experts and shared experts; every top-level JSON file but the shard
    index as a JSON layer named by its file name."""
    source_dir = Path(source_dir)
    builder = StoreBuilder(root)
    groups: dict[str, dict] = {}
    for path in sorted(source_dir.glob("*.safetensors")):
        for tensor, raw in tensors_of_file(path).items():
            kind = llm_tensor_quantization(tensor, raw.shape, quant_type) if quant_type else ""
            if expert_group(tensor):
                groups.setdefault(expert_group(tensor), {})[tensor] = raw
            elif kind:
                builder.add_quantized(tensor, raw, kind, layout="combined",
                                      global_scale=(global_scales or {}).get(tensor))
            else:
                builder.add_tensor(tensor, raw, key="full")
    for group, tensors in groups.items():
        add_packed_group(builder, group, tensors, quant_type, global_scales or {})
    for path in sorted(source_dir.glob("*.json")):
        if not path.name.endswith(".safetensors.index.json"):
            builder.add_json(path.name, path.read_bytes())
    return builder.write_manifest(name, config=config_v2(("completion",), file_type=quant_type))


def write_safetensors_dir(folder: str | os.PathLike, files: dict[str, dict], configs: dict[str, dict] | None = None):
    """A model folder: ``files`` maps ``relpath.safetensors`` -> tensors (Go writer),
    ``configs`` maps ``relpath.json`` -> JSON content."""
    folder = Path(folder)
    for relpath, tensors in files.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(go_safetensors(tensors))
    for relpath, content in (configs or {}).items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_text(json.dumps(content, indent=2))
    return folder
