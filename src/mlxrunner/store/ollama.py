"""OllamaSource: a model in an Ollama store, a manifest whose layers point at blobs (docs/formats.md).

Every layout era loads: E0–E3 blobs hold one tensor keyed ``"data"`` (quantization companions in
separate ``X_scale``/``X_qbias`` layers); E4 blobs are keyed by the tensor name (bare or with the
component) and carry their companions as ``k.scale``/``k.bias``; packed blobs hold many tensors
(experts). Blobs are ``blobs/sha256-<hex>`` or the old ``sha256:<hex>`` spelling.

Differences from Go, on purpose: in packed blobs ``X.bias`` is a quantization companion only
when ``X.scale`` exists too (Go hides every ``*.bias``); ``X.scale`` only when ``X`` exists.
A blob whose size differs from its manifest layer is refused (an interrupted copy); with
``verify=True`` its sha256 is checked too. With an empty component, E4 image-model blobs keyed by
the bare tensor name still come back under their full layer name (``transformer/...``), like every
other layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlxrunner.errors import ModelError
from mlxrunner.store.names import blobs_dir
from mlxrunner.store.safetensors import TensorInfo
from mlxrunner.store.source import ModelSource, TensorRef

TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    name: str  # "" when the layer has none


_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


class OllamaSource(ModelSource):
    """A model in an Ollama store: a manifest whose layers point at blobs (docs/formats.md).

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
        return next((layer for layer in self.layers if layer.media_type == JSON_MEDIA_TYPE and layer.name == relpath),
                    None)

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
    def _plan(self, component: str) -> dict[str, TensorRef]:
        prefix = component + "/" if component else ""
        by_name: dict[str, Layer] = {}
        for layer in self.tensor_layers:
            if layer.name.startswith(prefix):
                by_name[layer.name[len(prefix):]] = layer  # a later layer with the same name wins
        if not by_name:
            raise ModelError(f'no tensor layers found for component "{component}" in {self.manifest_path}')
        plan: dict[str, TensorRef] = {}
        for name, layer in by_name.items():
            path = self.blob_path(layer)
            infos, metadata = self._header(path)
            key = _find_key(name, component, infos)
            if key is not None:
                plan.update(_single_tensor_refs(name, key, path, infos, metadata))
            else:
                plan.update(_packed_refs(prefix, path, infos, metadata))
        return plan


def _find_key(name: str, component: str, infos: dict[str, TensorInfo]) -> str | None:
    """The blob key of layer ``name`` (docs/formats.md): bare name (E4), ``component/name`` (E4
    quantized), ``"data"`` (E0–E3)."""
    candidates = [name]
    if component:
        candidates.append(f"{component}/{name}")
    elif "/" in name:  # all layers of an image model: E4 blobs are keyed without the component
        candidates.append(name.split("/", 1)[1])
    candidates.append("data")
    return next((k for k in candidates if k in infos), None)


def _single_tensor_refs(name: str, key: str, path: Path, infos: dict[str, TensorInfo],
                        metadata: dict) -> dict[str, TensorRef]:
    refs = {name: TensorRef(path, key, infos[key], metadata)}
    if key + ".scale" in infos:
        refs[name + "_scale"] = TensorRef(path, key + ".scale", infos[key + ".scale"], metadata)
        if key + ".bias" in infos:
            refs[name + "_qbias"] = TensorRef(path, key + ".bias", infos[key + ".bias"], metadata)
        if key + ".global_scale" in infos:  # nvfp4's per-tensor scale, Ollama's linear factory name
            refs[name + "_global_scale"] = TensorRef(path, key + ".global_scale", infos[key + ".global_scale"],
                                                     metadata)
    return refs


def _packed_refs(prefix: str, path: Path, infos: dict[str, TensorInfo], metadata: dict) -> dict[str, TensorRef]:
    """A blob holding many tensors (packed experts): every tensor that is not a companion."""
    companions = {k + ".scale" for k in infos if k + ".scale" in infos}
    companions |= {k + suffix for k in infos for suffix in (".bias", ".global_scale")
                   if k + ".scale" in companions and k + suffix in infos}
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
