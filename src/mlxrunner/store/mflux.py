"""MfluxSource: a folder saved by mflux (``mflux-save``), read as the diffusers pipeline it was made from.

What mflux writes (docs/formats.md): one subfolder per component (``transformer/``, ``text_encoder/``,
``vae/``) with shards ``0.safetensors``, ``1.safetensors``, ... whose ``__metadata__`` (and the
``model.safetensors.index.json`` beside them) say ``quantization_level`` (the bits, or ``None``) and
``mflux_version``; ``tokenizer/``; since 0.24 a top-level ``mflux_model.json`` naming the model. Tensor names
are mflux's module paths, conv weights are in MLX's layout ``[O, kH, kW, I]``, and every Linear and
Embedding of every component (the VAE's attention too) is quantized affine, ``.weight``/``.scales``/
``.biases``, group size 64 unless the width asks for less.

This source turns that into the canonical view: diffusers' names (mflux's weight-mapping tables in reverse,
:data:`RENAMES`), conv weights back in PyTorch's ``[O, I, kH, kW]``, and the bits from
``quantization_level`` (the group size from the shapes, as mflux's own loader infers it). mflux writes no
``model_index.json``; this source makes one from the transformer's names. It writes no component
``config.json`` either (its networks have the released sizes built in): those must sit in the folder,
copied from the model it was saved from, or loading stops with an error that says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxrunner.errors import ModelError
from mlxrunner.store.directory import DirectorySource
from mlxrunner.store.quant import QuantHint
from mlxrunner.store.source import TensorRef

LEVEL_KEY = "quantization_level"
INFO_FILE = "mflux_model.json"
COMPONENTS = ("transformer", "text_encoder", "vae")
# mflux module path -> diffusers name, per pipeline and component: the inverse of mflux 0.24's
# z_image_weight_mapping.py and flux2_weight_mapping.py (names that are equal are not listed).
# tests/fixtures/mflux/*.json hold mflux's forward names for the tiny fixtures; the tests invert them.
_TEXT_ENCODER = ((r"^", "model."),)  # mflux's Qwen3 has no "model." level
RENAMES: dict[str, dict[str, tuple[tuple[str, Any], ...]]] = {
    "ZImagePipeline": {
        "transformer": ((r"^t_embedder\.linear([12])\.", lambda m: f"t_embedder.mlp.{2 * int(m[1]) - 2}."),
                        (r"^(all_final_layer\.[^.]+)\.adaLN_modulation\.0\.", r"\1.adaLN_modulation.1.")),
        "text_encoder": _TEXT_ENCODER,
        "vae": ((r"^((?:en|de)coder\.conv_(?:in|out))\.conv(?:2d)?\.", r"\1."),
                (r"^((?:en|de)coder\.conv_norm_out)\.norm\.", r"\1.")),
    },
    "Flux2KleinPipeline": {
        "transformer": ((r"^time_guidance_embed\.linear_", "time_guidance_embed.timestep_embedder.linear_"),
                        (r"^(transformer_blocks\.\d+\.attn\.to_out)\.", r"\1.0.")),
        "text_encoder": _TEXT_ENCODER,
        "vae": ((r"^((?:en|de)coder\.mid_block\.attentions\.0\.to_out)\.", r"\1.0."),),
    },
}
# Which pipeline a transformer is, by a name only its mflux module tree has.
ARCHITECTURE_MARKERS = (("noise_refiner.", "ZImagePipeline"), ("single_transformer_blocks.", "Flux2KleinPipeline"))


def is_mflux_folder(root: Path) -> bool:
    """A folder whose transformer's index or first shard carries mflux's ``quantization_level``."""
    folder = root / "transformer"
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return LEVEL_KEY in (json.loads(index.read_bytes()).get("metadata") or {})
        first = folder / "0.safetensors"
        return first.is_file() and LEVEL_KEY in _file_metadata(first)
    except (OSError, ValueError, AttributeError):
        return False


def _file_metadata(path: Path) -> dict:
    from mlxrunner.store.safetensors import header_metadata, read_safetensors_header

    return header_metadata(read_safetensors_header(path)[0])


def mflux_to_diffusers(name: str, rules: tuple[tuple[str, Any], ...]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name, count=1)
    return name


class MfluxSource(DirectorySource):
    """An mflux-saved folder with diffusers' names (module docstring)."""

    def __init__(self, name: str, root):
        super().__init__(name, root)
        self.architecture = self._architecture()
        missing = [f"{c}/config.json" for c in COMPONENTS if not self.has_file(f"{c}/config.json")]
        if missing:
            raise ModelError(f"{self.location}: mflux saves no {', '.join(missing)}; copy them (and scheduler/) "
                             f"from the {self._model_name() or 'original'} diffusers folder this one was saved "
                             "from")

    # -- files -----------------------------------------------------------------------------
    def has_file(self, relpath: str) -> bool:
        return relpath == "model_index.json" or super().has_file(relpath)

    def read_json(self, relpath: str, expect: type = dict) -> Any:
        if relpath == "model_index.json" and not super().has_file(relpath):
            return self._model_index()
        return super().read_json(relpath, expect)

    # -- tensors ---------------------------------------------------------------------------
    def tensors(self, component: str = "") -> dict[str, mx.array]:
        """As stored, except conv weights: mflux keeps MLX's [O, kH, kW, I], diffusers' is [O, I, kH, kW]."""
        tensors = super().tensors(component)
        if component == "vae":
            return {n: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for n, v in tensors.items()}
        return tensors

    def _plan(self, component: str) -> dict[str, TensorRef]:
        rules = RENAMES[self.architecture].get(component, ())
        return {mflux_to_diffusers(name, rules): ref for name, ref in super()._plan(component).items()}

    def _config_quant_hints(self, component: str) -> list[QuantHint]:
        """``quantization_level`` names the bits (affine; the group size comes from the shapes); ``None``
        means mflux saved the component unquantized."""
        levels = {(ref.metadata.get(LEVEL_KEY), ref.path) for ref in self._cached_plan(component).values()}
        if len({level for level, _ in levels}) > 1:
            found = ", ".join(sorted(f"{path.name}: {level!r}" for level, path in levels))
            raise ModelError(f"{self.location}: {component}: the shards disagree on {LEVEL_KEY} ({found})")
        hints = super()._config_quant_hints(component)
        if not levels:
            return hints
        level, path = levels.pop()
        source = f"{path} __metadata__ {LEVEL_KEY} {level!r}"
        if level in (None, "None", "null", ""):
            return [QuantHint(source, quantized=False)] + hints
        try:
            bits = int(level)
        except ValueError:
            raise ModelError(f"{self.location}: {component}: {source} is not a number of bits") from None
        return [QuantHint(source, bits=bits, mode="affine")] + hints

    # -- what mflux does not write ---------------------------------------------------------
    def _architecture(self) -> str:
        names = super()._plan("transformer")
        for marker, architecture in ARCHITECTURE_MARKERS:
            if any(name.startswith(marker) for name in names):
                return architecture
        raise ModelError(f"{self.location}: an mflux folder, but its transformer is neither Z-Image's nor "
                         "FLUX.2 Klein's (no noise_refiner.* or single_transformer_blocks.* tensors)")

    def _model_name(self) -> str:
        """mflux_model.json's model name (mflux 0.24 writes it), else ""."""
        if not super().has_file(INFO_FILE):
            return ""
        info = super().read_json(INFO_FILE)
        return str(info.get("base_model") or info.get("model_name") or "")

    def _model_index(self) -> dict:
        """What diffusers' model_index.json would say: the pipeline, and whether it is the distilled model
        (mflux's model name, else the folder's: Z-Image "turbo", FLUX.2 Klein not "base")."""
        named = f"{self._model_name()} {self.root.name}".lower()
        distilled = "turbo" in named if self.architecture == "ZImagePipeline" else "base" not in named
        return {"_class_name": self.architecture, "is_distilled": distilled}
