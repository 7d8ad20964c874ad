"""Ollama model names -> their parts, and where a name's manifest lives in a store.

Names are parsed like Ollama's parent-side ``model.ParseName`` (docs/formats.md): the tag is cut
only at a ``:`` after the last ``/`` (so ``host:5000/ns/m:tag`` works); defaults are
``registry.ollama.ai`` / ``library`` / ``latest``; each part must match Ollama's character
rules. So a name cannot escape the store: ``..`` or ``.`` parts, empty parts, backslashes,
NUL and more than three ``/``-parts are refused with a ModelError that says why. (Go's
runner-side resolver cut the tag at any last ``:`` and kept 4+-part names whole; neither can
come from the parent, whose names always pass ``ParseName``.)

A store is laid out as ``<root>/manifests/<host>/<namespace>/<model>/<tag>`` and
``<root>/blobs/sha256-<hex>``; the root is ``$OLLAMA_MODELS``, else ``~/.ollama/models``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlxrunner import settings
from mlxrunner.errors import ModelError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"


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


def ollama_models_dir() -> Path:
    """``$OLLAMA_MODELS`` (trimmed of whitespace, then quotes, like Go's ``envconfig.Var``),
    else ``~/.ollama/models``."""
    value = settings.ollama_models_env()
    return Path(value) if value else Path.home() / ".ollama" / "models"


def store_root(models_dir: str | os.PathLike | None) -> Path:
    """The store to use: ``models_dir`` when given, else :func:`ollama_models_dir`."""
    return Path(models_dir) if models_dir is not None else ollama_models_dir()


def manifests_dir(models_dir: str | os.PathLike | None = None) -> Path:
    return store_root(models_dir) / "manifests"


def blobs_dir(models_dir: str | os.PathLike | None = None) -> Path:
    return store_root(models_dir) / "blobs"


def manifest_path(name: str, models_dir: str | os.PathLike | None = None) -> Path:
    """Where the manifest of an Ollama model name lives (whether or not it exists)."""
    return manifests_dir(models_dir) / Path(*parse_model_name(name).relpath.split("/"))
