"""A float image model (a diffusers folder: Z-Image or FLUX.2 Klein) -> a quantized folder we load
(docs/formats.md); the command is ``mlxrunner quantize``.

The output keeps the diffusers layout (``model_index.json``, one subfolder per component, the tokenizer
and scheduler files copied). The text encoder's and the transformer's quantized linears are stored as
mlx-lm stores them (``.weight`` packed uint32, ``.scales``, ``.biases`` for affine), and each of the two
components' ``config.json`` gets a ``quantization`` object in mlx-lm's form with one entry per quantized
module, so a module's parameters never have to be guessed from shapes.

Which tensors, as Ollama's importer chose for image models, plus its LLM rules for the text encoder:

* the VAE stays float, and so do names containing ``embed``, ``norm``, ``ln_`` or ``layernorm``, biases,
  tensors that are not 2-D, tensors under 1024 elements and tensors whose column count the group size
  does not divide;
* in a 4-bit mode the sensitive projections (``.v_proj``, ``.k_proj``, ``down_proj``) get the family's
  8-bit type (affine 8-bit at the same group size; mxfp8 for mxfp4/nvfp4), as Ollama promotes them;
* ``text_encoder_bits=8`` puts the whole text encoder at the 8-bit type while the transformer is 4-bit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mlxrunner.errors import ModelError
from mlxrunner.quantize import ShardWriter, quantize_tensor
from mlxrunner.store import ModelSource, QuantParams
from mlxrunner.store.directory import DirectorySource

QUANTIZED_COMPONENTS = ("text_encoder", "transformer")
FLOAT_COMPONENTS = ("vae",)
FLOAT_NAME_PARTS = ("embed", "norm", "ln_", "layernorm")  # Ollama's ShouldQuantize
PROMOTED_NAME_PARTS = (".v_proj", ".k_proj", "down_proj")  # Ollama's 4-bit promotions
MIN_ELEMENTS = 1024


def eight_bit(base: QuantParams) -> QuantParams:
    """The family's 8-bit type: affine stays affine at its group size; the fp4 modes go to mxfp8."""
    if base.bits == 8:
        return base
    return QuantParams(8, base.group_size, "affine") if base.mode == "affine" else QuantParams(8, 32, "mxfp8")


def image_tensor_params(name: str, shape: tuple[int, ...], base: QuantParams) -> QuantParams | None:
    """The parameters one text-encoder or transformer tensor is quantized with, or None to keep it float."""
    if (not name.endswith(".weight") or len(shape) != 2 or any(part in name for part in FLOAT_NAME_PARTS)
            or shape[0] * shape[1] < MIN_ELEMENTS):
        return None
    params = base
    if base.bits == 4 and any(part in name for part in PROMOTED_NAME_PARTS):
        params = eight_bit(base)
        if shape[-1] % params.group_size:
            params = base  # the promotion does not fit: the base type, as Ollama falls back
    return params if shape[-1] % params.group_size == 0 else None


def float_image_folder(src: str, models_dir: str | None = None) -> DirectorySource | None:
    """``src`` as a float diffusers image folder, or None when it is not an image model."""
    from mlxrunner.detect import Mode, detect
    from mlxrunner.store import resolve

    source = resolve(src, models_dir)
    if detect(source).mode is not Mode.IMAGEGEN:
        return None
    if not isinstance(source, DirectorySource):
        raise ModelError(f"{src}: quantize reads image models from a diffusers folder, not {source.location}")
    for component in QUANTIZED_COMPONENTS + FLOAT_COMPONENTS:
        if source.quantization(component):
            raise ModelError(f"{src}: the {component} is quantized already; quantize a float checkpoint")
    return source


def image_tensor_count(source: ModelSource) -> int:
    """How many tensors quantize_image_model walks (for the progress bar)."""
    return sum(len(source.tensors(c)) for c in QUANTIZED_COMPONENTS + FLOAT_COMPONENTS)


def quantize_image_model(source: DirectorySource, dst: Path, base: QuantParams, text_encoder_bits: int | None = None,
                         progress: Callable[[int], None] | None = None) -> dict[str, dict[str, QuantParams]]:
    """Write the quantized folder; returns each component's quantized weights and their parameters."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModelError(f"{dst} exists and is not an empty folder; choose a new one")
    _copy_other_files(source.root, dst)
    if not (dst / "model_index.json").exists():  # an mflux folder: its source makes one up
        (dst / "model_index.json").write_text(json.dumps(source.read_json("model_index.json"), indent=2))
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done)

    chosen: dict[str, dict[str, QuantParams]] = {}
    for component in QUANTIZED_COMPONENTS + FLOAT_COMPONENTS:
        component_base = None
        if component in QUANTIZED_COMPONENTS:
            component_base = eight_bit(base) if component == "text_encoder" and text_encoder_bits == 8 else base
        chosen[component] = _write_component(source, component, dst / component, component_base, advance)
        if component_base is not None:
            config = source.read_json(f"{component}/config.json")
            config["quantization"] = _mlx_lm_quantization(component_base, chosen[component])
            (dst / component / "config.json").write_text(json.dumps(config, indent=2))
    return {c: params for c, params in chosen.items() if params}


def _write_component(source: DirectorySource, component: str, folder: Path, base: QuantParams | None,
                     advance: Callable[[], None]) -> dict[str, QuantParams]:
    """One component's tensors, quantized where the policy says (``base`` None: all float), in shards."""
    tensors = source.tensors(component)
    writer = ShardWriter(folder)
    chosen = {}
    for name in sorted(tensors):
        value = tensors.pop(name)  # so that memory holds one shard, not the component
        params = None if base is None else image_tensor_params(name, tuple(value.shape), base)
        if params is None:
            writer.add({name: value})
        else:
            chosen[name] = params
            writer.add(quantize_tensor(name, value, params))
        advance()
    writer.finish()
    return chosen


def _mlx_lm_quantization(base: QuantParams, chosen: dict[str, QuantParams]) -> dict:
    """mlx-lm's ``quantization`` object: the component's base parameters and an entry per quantized module."""
    def entry(params: QuantParams) -> dict:
        return {"group_size": params.group_size, "bits": params.bits, "mode": params.mode}

    return entry(base) | {name.removesuffix(".weight"): entry(params) for name, params in sorted(chosen.items())}


def _copy_other_files(src: Path, dst: Path) -> None:
    """Everything but the weights: model_index.json, configs, tokenizer and scheduler files (an mflux
    folder's mflux_model.json too, harmless). Linked folders are followed: benchmarks/ links one text encoder
    into several model folders."""
    for folder, _, files in os.walk(src, followlinks=True):
        relative = Path(folder).relative_to(src)
        for filename in files:
            if filename.endswith((".safetensors", ".safetensors.index.json")):
                continue
            (dst / relative).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder) / filename, dst / relative / filename)
