"""DirectorySource: a model folder on disk (diffusers pipelines, HF / mlx-lm folders, embedded models).

A diffusers pipeline has ``model_index.json`` and one subfolder per component; an HF folder has
``config.json`` and top-level ``*.safetensors``. Either may be sharded (``*.safetensors.index.json``).
mlx-lm's quantized names (``X.scales``/``X.biases``) are renamed to the canonical view of
:mod:`mlxrunner.store.source`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlxrunner.errors import ModelError
from mlxrunner.store.source import ModelSource, TensorRef


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

    def _plan(self, component: str) -> dict[str, TensorRef]:
        raw: dict[str, TensorRef] = {}
        for path in self._safetensors_files(component):
            infos, metadata = self._header(path)
            for key, info in infos.items():
                if key in raw:
                    raise ModelError(f"tensor {key!r} is in both {raw[key].path} and {path}")
                raw[key] = TensorRef(path, key, info, metadata)
        return _canonical_mlx_lm_names(raw)


def _canonical_mlx_lm_names(raw: dict[str, TensorRef]) -> dict[str, TensorRef]:
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
