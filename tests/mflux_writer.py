"""mflux's saved layout (``mflux-save -q BITS``) written from a tiny diffusers fixture, as mflux would write it.

mflux cannot build a tiny model (its networks have the released sizes built in), so this writer repeats
what ``ModelSaver.save_model`` does, with mflux's own names: tests/fixtures/mflux/<fixture>.json, recorded
from mflux 0.24's weight-mapping tables by scripts/mflux_names.py (diffusers name -> [mflux name, the
transform mflux applies]). On top of the names, as mflux does:

- every tensor in the model precision, bfloat16; conv weights in MLX's layout ``[O, kH, kW, I]``;
- ``nn.quantize`` of every Linear and Embedding of every component, the VAE included (in these diffusers
  models exactly the 2-D ``.weight`` tensors), affine at ``bits``, stored ``.weight``/``.scales``/``.biases``;
- shards ``0.safetensors`` with ``__metadata__`` ``{"quantization_level", "mflux_version"}`` and
  ``model.safetensors.index.json`` with the same metadata; ``tokenizer/``; ``mflux_model.json``.

One difference, forced by the tiny widths (32, 48, 96): mflux quantizes with MLX's group size 64; here a
layer takes 64 when it divides its columns, else 32, and stays float when neither does (mflux's loader
reads each layer's group size from its shapes and takes a layer without scales as float).

Not written by mflux: the components' ``config.json`` and ``scheduler/``, copied from the fixture when
``with_configs`` (a user must copy them from the model the folder was saved from).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

FIXTURES = Path(__file__).parent / "fixtures"
COMPONENTS = ("vae", "transformer", "text_encoder")  # mflux's order
MODEL_NAMES = {"zimage-tiny": "z-image-turbo", "flux2-klein-tiny": "flux2-klein-4b"}
TRANSFORMS = {"transpose_conv2d_weight": lambda w: w.transpose(0, 2, 3, 1)}


def mflux_names(fixture: str) -> dict:
    return json.loads((FIXTURES / "mflux" / f"{fixture}.json").read_text())


def group_size_for(columns: int) -> int | None:
    return next((g for g in (64, 32) if columns % g == 0), None)


def write_mflux_folder(fixture: str, out: Path, bits: int | None = 4, with_configs: bool = True,
                       dtype: mx.Dtype = mx.bfloat16) -> Path:
    """``bits`` None: saved unquantized (``mflux-save`` without ``-q``: quantization_level "None")."""
    names = mflux_names(fixture)
    source = FIXTURES / fixture
    metadata = {"quantization_level": str(bits), "mflux_version": names["mflux_version"]}
    shutil.copytree(source / "tokenizer", out / "tokenizer")
    for component in COMPONENTS:
        tensors: dict[str, mx.array] = {}
        for path in sorted((source / component).glob("*.safetensors")):
            tensors |= mx.load(str(path))
        saved = {}
        for name, (mflux_name, transform) in names[component].items():
            value = tensors[name].astype(dtype)
            if transform:
                value = TRANSFORMS[transform](value)
            saved |= quantized_module(mflux_name, value, bits) if bits else {mflux_name: value}
        (out / component).mkdir(parents=True)
        mx.save_safetensors(str(out / component / "0.safetensors"), saved, metadata=metadata)
        index = {"metadata": metadata, "weight_map": dict.fromkeys(saved, "0.safetensors")}
        (out / component / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if with_configs:
            shutil.copyfile(source / component / "config.json", out / component / "config.json")
    if with_configs:
        shutil.copytree(source / "scheduler", out / "scheduler")
    info = {"format_version": 1, "mflux_version": names["mflux_version"], "model_name": MODEL_NAMES[fixture],
            "base_model": None, "quantize": bits}
    (out / "mflux_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def quantized_module(name: str, value: mx.array, bits: int) -> dict[str, mx.array]:
    """What nn.quantize leaves for one tensor: a Linear's or Embedding's packed weight with its scales and
    biases, anything else as it is."""
    group_size = group_size_for(value.shape[-1])
    if not name.endswith(".weight") or value.ndim != 2 or group_size is None:
        return {name: value}
    module = name.removesuffix(".weight")
    packed, scales, biases = mx.quantize(value, group_size=group_size, bits=bits)
    return {f"{module}.weight": packed, f"{module}.scales": scales, f"{module}.biases": biases}
