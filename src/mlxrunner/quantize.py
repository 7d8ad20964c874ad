"""A float LLM -> an mlx-lm quantized folder (docs/formats.md); the command is ``mlxrunner quantize``.

The output is what ``mlx_lm.convert --quantize`` writes, so mlx-lm loads it too: ``config.json`` with
``quantization`` (copied to ``quantization_config``), each quantized module as ``.weight`` (packed
uint32), ``.scales`` and, for affine, ``.biases``; shards ``model.safetensors`` or
``model-0000i-of-0000N.safetensors`` of at most 5 GiB with their index; the tokenizer files copied.

Which tensors, as mlx-lm decides for Llama and Qwen3: every Linear and the token embedding (in
these architectures exactly the 2-D ``.weight`` tensors) whose column count the group size divides;
norms and biases stay float. A tied LM head has no tensor: it is the quantized embedding.
``--mixed`` follows mlx-lm's mixed recipes: ``lm_head``, and ``v_proj``/``down_proj`` in the first
and last eighth of the layers and every third in between, get more bits (affine 4 -> 6, i.e. mlx-lm's
``mixed_4_6``; mxfp4/nvfp4 -> mxfp8, Ollama's promotion for the fp4 types). Each module's parameters
are then recorded in ``config.json``, as mlx-lm does.

Tensors are read lazily and written shard by shard, so memory holds one shard, not the model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxrunner.errors import ModelError
from mlxrunner.store import ModelSource, QuantParams, resolve
from mlxrunner.store.quant import MLX_MODES, check_params

SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
DEFAULT_GROUP_SIZE = {"affine": 64, "mxfp4": 32, "nvfp4": 16, "mxfp8": 32}
# Files of an LLM folder other than weights and config.json that a loader may read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json")
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Recipe:
    """What every quantizable tensor gets: ``base``; with ``high``, the sensitive ones get ``high``."""

    base: QuantParams
    high: QuantParams | None = None

    @property
    def mixed(self) -> bool:
        return self.high is not None


def recipe(bits: int, group_size: int | None, mode: str, mixed: bool) -> Recipe:
    """The command line's choice, checked against what MLX runs."""
    if mode not in MLX_MODES:
        raise ModelError(f"--mode {mode}: MLX has {', '.join(MLX_MODES)}")
    base = QuantParams(bits, group_size or DEFAULT_GROUP_SIZE[mode], mode)
    check_params(base, "--bits/--group-size/--mode")
    if not mixed:
        return Recipe(base)
    if bits == 8:
        raise ModelError("--mixed gives sensitive layers more bits than --bits; at 8 bits there are none more")
    high = QuantParams(6, base.group_size, "affine") if mode == "affine" else QuantParams(8, 32, "mxfp8")
    return Recipe(base, high)


def use_more_bits(layer: int, num_layers: int) -> bool:
    """mlx-lm's (and llama.cpp's) cadence: the first and last eighth, and every third layer between."""
    return layer < num_layers // 8 or layer >= 7 * num_layers // 8 or (layer - num_layers // 8) % 3 == 2


def tensor_params(name: str, shape: tuple[int, ...], chosen: Recipe, num_layers: int) -> QuantParams | None:
    """The parameters one tensor is quantized with, or None to keep it float."""
    if not name.endswith(".weight") or len(shape) != 2:
        return None  # norms, biases: float
    params = chosen.base
    if chosen.mixed and _is_sensitive(name, num_layers):
        params = chosen.high
    if shape[-1] % params.group_size:
        params = chosen.base  # the promotion does not fit: the base type, as Ollama falls back
    return params if shape[-1] % params.group_size == 0 else None


def _is_sensitive(name: str, num_layers: int) -> bool:
    if name.endswith("lm_head.weight"):
        return True
    match = LAYER_INDEX.search(name)
    return (match is not None and ("v_proj" in name or "down_proj" in name)
            and use_more_bits(int(match.group(1)), num_layers))


def quantized_config(config: dict, chosen: Recipe, per_module: dict[str, QuantParams]) -> dict:
    """config.json as mlx-lm writes it: ``quantization`` (+ per-module entries for mixed recipes) copied to
    ``quantization_config``; both rope forms, keys sorted."""
    quantization = _as_mlx_lm(chosen.base)
    if chosen.mixed:
        quantization |= {module: _as_mlx_lm(params) for module, params in per_module.items()}
    out = with_both_rope_forms(config) | {"quantization": quantization, "quantization_config": quantization}
    return dict(sorted(out.items()))


def with_both_rope_forms(config: dict) -> dict:
    """Top-level rope_theta / rope_scaling beside transformers 5's rope_parameters: the same model for us,
    and mlx-lm 0.32.2's Llama reads only the top-level keys (without them it runs theta 1e4, no scaling)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return dict(config)
    out = dict(config)
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    return out


def _as_mlx_lm(params: QuantParams) -> dict:
    return {"group_size": params.group_size, "bits": params.bits, "mode": params.mode}


class ShardWriter:
    """Writes tensors in shards of at most ``limit`` bytes, named as mlx-lm names them at the end."""

    def __init__(self, folder: Path, limit: int = SHARD_BYTES):
        self.folder = folder
        self.limit = limit
        self.pending: dict[str, mx.array] = {}
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, mx.array]) -> None:
        size = sum(t.nbytes for t in tensors.values())
        if self.pending and sum(t.nbytes for t in self.pending.values()) + size > self.limit:
            self._flush()
        self.pending |= tensors
        self.total_bytes += size

    def finish(self) -> list[Path]:
        self._flush()
        count = len(self.written)
        names = ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                          for i in range(1, count + 1)]
        weight_map = {}
        for (path, keys), name in zip(self.written, names):
            path.rename(self.folder / name)
            weight_map |= dict.fromkeys(keys, name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        return [self.folder / n for n in names]

    def _flush(self) -> None:
        if not self.pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f".shard-{len(self.written)}.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        self.written.append((path, list(self.pending)))
        self.pending = {}


def quantize_tensor(name: str, value: mx.array, params: QuantParams) -> dict[str, mx.array]:
    """One weight -> mlx-lm's ``P.weight``/``P.scales``[/``P.biases``], in the weight's own dtype."""
    module = name.removesuffix(".weight")
    parts = mx.quantize(value, group_size=params.group_size, bits=params.bits, mode=params.mode)
    out = {f"{module}.weight": parts[0], f"{module}.scales": parts[1]}
    if params.mode == "affine":
        out[f"{module}.biases"] = parts[2]
    mx.eval(*out.values())
    return out


def float_llm(src: str, models_dir: str | None = None) -> ModelSource:
    """The model to quantize: an LLM, not quantized yet."""
    from mlxrunner.detect import Mode, detect

    source = resolve(src, models_dir)
    if detect(source).mode is not Mode.LLM:
        raise ModelError(f"{src}: quantize handles LLMs (Llama, Qwen3) and image models (Z-Image, "
                         "FLUX.2 Klein) only")
    if source.quantization(""):
        raise ModelError(f"{src} is quantized already; quantize a float checkpoint")
    return source


def quantize_model(source: ModelSource, tensors: dict[str, mx.array], dst: Path, chosen: Recipe,
                   progress: Callable[[int], None] | None = None) -> dict[str, QuantParams]:
    """Write the quantized folder from ``source``'s (lazy) ``tensors``, emptying the dict as it goes so
    that memory holds one shard; returns each quantized weight's parameters."""
    config = source.read_json("config.json")
    num_layers = int(config.get("num_hidden_layers") or 0)
    _make_empty_folder(dst)
    writer = ShardWriter(dst)
    chosen_params: dict[str, QuantParams] = {}
    for done, name in enumerate(sorted(tensors), 1):
        value = tensors.pop(name)
        params = tensor_params(name, tuple(value.shape), chosen, num_layers)
        if params is None:
            writer.add({name: value})
        else:
            chosen_params[name] = params
            writer.add(quantize_tensor(name, value, params))
        if progress:
            progress(done)
    writer.finish()
    per_module = {name.removesuffix(".weight"): p for name, p in chosen_params.items()}
    (dst / "config.json").write_text(json.dumps(quantized_config(config, chosen, per_module), indent=4))
    for filename in TOKENIZER_FILES:
        if source.has_file(filename):
            shutil.copyfile(source.file_path(filename), dst / filename)
    return chosen_params


def _make_empty_folder(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModelError(f"{dst} exists and is not an empty folder; choose a new one")
    dst.mkdir(parents=True, exist_ok=True)
