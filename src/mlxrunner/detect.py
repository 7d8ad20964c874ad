"""What kind of model is this? ModelSource -> Mode and model class.

Rules (docs/ARCHITECTURE.md, Ollama's `DetectModelType`):
- `model_index.json` present: a diffusers pipeline. Its `architecture` (Ollama's normalised
  index), else `_class_name`, must be one of IMAGE_PIPELINES -> image generation.
- `config.json` present: a transformers model. An encoder architecture (BERT family) or a
  sentence-transformers folder (`modules.json`) -> embedding; anything else -> LLM.
A folder that is neither, or a pipeline we do not serve, is a ModelError that names what was found.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlxrunner.errors import ModelError

if TYPE_CHECKING:
    from mlxrunner.store import ModelSource

IMAGE_PIPELINES = ("ZImagePipeline", "FluxPipeline", "Flux2KleinPipeline")

# transformers architectures that are encoders: they embed, they do not generate.
ENCODER_ARCHITECTURE_PREFIXES = ("Bert",)


class Mode(str, enum.Enum):
    IMAGEGEN = "imagegen"
    LLM = "llm"
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class Detected:
    mode: Mode
    architecture: str  # pipeline class or transformers architecture, as found in the model


def detect(source: ModelSource) -> Detected:
    if source.has_file("model_index.json"):
        return _detect_pipeline(source)
    if source.has_file("config.json"):
        return _detect_transformers(source)
    raise ModelError(
        f"{source.location} is not a model: it has neither model_index.json (a diffusers pipeline) "
        "nor config.json (a transformers model)")


def _detect_pipeline(source: ModelSource) -> Detected:
    index = source.read_json("model_index.json")
    architecture = index.get("architecture") or index.get("_class_name") or ""
    if architecture not in IMAGE_PIPELINES:
        found = f"'{architecture}'" if architecture else "no architecture or _class_name"
        raise ModelError(
            f"unsupported image model: model_index.json names {found}; supported: {', '.join(IMAGE_PIPELINES)}")
    return Detected(Mode.IMAGEGEN, architecture)


def _detect_transformers(source: ModelSource) -> Detected:
    config = source.read_json("config.json")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelError('config.json: "architectures" must be a list of names')
    architecture = architectures[0] if architectures else config.get("model_type", "")
    is_encoder = any(a.startswith(ENCODER_ARCHITECTURE_PREFIXES) for a in architectures) or \
        config.get("model_type") == "bert"
    if is_encoder or source.has_file("modules.json"):
        return Detected(Mode.EMBEDDING, architecture or "BertModel")
    if not architecture:
        raise ModelError('config.json names no "architectures" and no "model_type": cannot tell what model it is')
    return Detected(Mode.LLM, architecture)
