"""Model names and paths -> ModelSource: a model directory, or a model in an Ollama store.

Resolution order of :func:`resolve` (first match wins):

1. **An existing directory** (absolute or relative to the working directory, ``~`` expanded)
   -> :class:`DirectorySource`, or :class:`MfluxSource` for a folder mflux saved. An absolute path that
   is not a directory is an error, never a store name.
2. **An Ollama model name** looked up in the store (``models_dir``, else
   :func:`ollama_models_dir`): ``<root>/manifests/<host>/<namespace>/<model>/<tag>``
   -> :class:`OllamaSource`. A manifest without safetensors tensor layers (a GGUF model pulled
   for the llama.cpp engine) does not count: this runner cannot load it.
3. **An embedded model name**: models shipped as pip packages (see :mod:`.embedded`).

One job per module:

* :mod:`.names`: Ollama model names, their validation and where their manifests live;
* :mod:`.source`: :class:`ModelSource`, the files-and-tensors interface both sources share;
* :mod:`.directory`: :class:`DirectorySource`, model folders;
* :mod:`.mflux`: :class:`MfluxSource`, folders mflux saved (its names and layouts -> diffusers');
* :mod:`.ollama`: :class:`OllamaSource`, manifests and blobs of every layout era;
* :mod:`.embedded`: default models shipped as pip packages;
* :mod:`.safetensors`: the safetensors header parser and loader;
* :mod:`.quant`: quantization metadata -> :class:`QuantParams`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlxrunner.errors import ModelError
from mlxrunner.store.directory import DirectorySource
from mlxrunner.store.embedded import embedded_source
from mlxrunner.store.mflux import MfluxSource, is_mflux_folder
from mlxrunner.store.names import (
    ModelName,
    blobs_dir,
    manifest_path,
    manifests_dir,
    ollama_models_dir,
    parse_model_name,
    store_root,
)
from mlxrunner.store.ollama import OllamaSource
from mlxrunner.store.quant import QuantParams
from mlxrunner.store.source import ModelSource

__all__ = [
    "DirectorySource",
    "MfluxSource",
    "ModelName",
    "ModelSource",
    "OllamaSource",
    "QuantParams",
    "blobs_dir",
    "manifest_path",
    "manifests_dir",
    "ollama_models_dir",
    "parse_model_name",
    "resolve",
]


def resolve(name: str, models_dir: str | os.PathLike | None = None, *, verify: bool = False) -> ModelSource:
    """A model name or path -> its ModelSource (order in the module docstring).

    ``verify=True`` checks each Ollama blob's sha256 when it is first read (slow for big models).
    """
    if not name or "\x00" in name:
        raise ModelError(f"invalid model name {name!r}: it is empty or contains NUL")
    as_path = Path(name).expanduser()
    if as_path.is_dir():
        return MfluxSource(name, as_path) if is_mflux_folder(as_path) else DirectorySource(name, as_path)
    if as_path.is_absolute():
        what = "is not a directory" if as_path.exists() else "does not exist"
        raise ModelError(f'model "{name}" not found: the path {what}')
    parsed = parse_model_name(name)
    root = store_root(models_dir)
    manifest = manifest_path(name, root)
    if manifest.is_file():
        source = OllamaSource(name, root, manifest, verify=verify)
        if source.has_tensor_layers():
            return source
        embedded = embedded_source(name, parsed)
        if embedded is not None:
            return embedded
        raise ModelError(f'model "{name}" ({manifest}) has no safetensors tensor layers: it is not a model '
                         "for the MLX engine (a GGUF model?)")
    embedded = embedded_source(name, parsed)
    if embedded is not None:
        return embedded
    raise ModelError(f'model "{name}" not found: no directory of that name and no manifest at {manifest}')
