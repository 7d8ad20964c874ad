"""`mlxrunner quantize` on image models: the tiny Z-Image and FLUX.2 Klein folders quantized by the command
run packed, draw what the float model holding the exactly dequantized weights draws (within one level of
255), follow Ollama's policy (VAE, embedders, norms float; 8-bit promotions in 4-bit modes) and hold
their file's bytes in memory, not the float model's.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mflux_writer import write_mflux_folder
from quant_helpers import dequantized_image_folder

from mlxrunner import _core
from mlxrunner.cli.quantize import main
from mlxrunner.detect import detect
from mlxrunner.imagegen import load_pipeline, pipeline_class
from mlxrunner.imagegen.text_encoder import encoder_tensors
from mlxrunner.store import QuantParams, resolve

FIXTURES = Path(__file__).parents[1] / "fixtures"
# The tiny models' widths (32, 48, 96) take affine group size 32, not 64.
RECIPES = {"int4-g32": ["--bits", "4", "--group-size", "32"], "int8-g32": ["--bits", "8", "--group-size", "32"],
           "nvfp4": ["--bits", "4", "--mode", "nvfp4"], "mxfp8": ["--bits", "8", "--mode", "mxfp8"],
           "int4-te8": ["--bits", "4", "--group-size", "32", "--text-encoder-bits", "8"]}
CASES = [("zimage-tiny", "int4-g32"), ("zimage-tiny", "mxfp8"), ("zimage-tiny", "int4-te8"),
         ("flux2-klein-tiny", "nvfp4"), ("flux2-klein-tiny", "int8-g32")]
REQUEST = dict(width=64, height=64, steps=2, seed=7)
PROMPT = "a red fox in the snow"


def quantized(tmp_path: Path, fixture: str, recipe: str) -> Path:
    out = tmp_path / f"{fixture}-{recipe}"
    assert main([str(FIXTURES / fixture), str(out), *RECIPES[recipe]]) == 0
    return out


@pytest.mark.parametrize("fixture, recipe", CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_quantized_folder_draws_the_dequantized_image(tmp_path, fixture, recipe):
    folder = quantized(tmp_path, fixture, recipe)
    ours = load_pipeline(str(folder))
    assert len(ours.source.quantization("transformer")) >= 4 and ours.source.quantization("text_encoder")
    reference = load_pipeline(str(dequantized_image_folder(ours.source, FIXTURES / fixture, tmp_path / "float")))
    a = np.asarray(ours.generate(PROMPT, **REQUEST)).astype(int)
    b = np.asarray(reference.generate(PROMPT, **REQUEST)).astype(int)
    assert np.abs(a - b).max() <= 1


def test_policy_follows_ollama(tmp_path):
    source = resolve(str(quantized(tmp_path, "zimage-tiny", "int4-g32")))
    transformer, text_encoder = source.quantization("transformer"), source.quantization("text_encoder")
    assert source.quantization("vae") == {}
    four, eight = QuantParams(4, 32, "affine"), QuantParams(8, 32, "affine")
    assert transformer["layers.0.attention.to_q.weight"] == transformer["layers.1.adaLN_modulation.0.weight"] == four
    float_names = [n for n in source.tensors("transformer") if n.endswith(".weight") and n not in transformer]
    assert float_names and all("embed" in n or "norm" in n for n in float_names), float_names
    # In 4-bit mode the text encoder's down_proj is promoted to 8 bits; o_proj stays at 4. Its q/k/v and
    # gate/up (48 columns) do not split into groups of 32 and stay float, as does the embedding.
    assert text_encoder["model.layers.0.mlp.down_proj.weight"] == eight
    assert text_encoder["model.layers.0.self_attn.o_proj.weight"] == four
    assert "model.embed_tokens.weight" not in text_encoder
    config = json.loads((Path(source.location) / "text_encoder" / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}


def test_text_encoder_bits_8_with_a_4_bit_transformer(tmp_path):
    source = resolve(str(quantized(tmp_path, "zimage-tiny", "int4-te8")))
    assert {p.bits for p in source.quantization("text_encoder").values()} == {8}
    assert {p.bits for p in source.quantization("transformer").values()} == {4}



def test_a_component_linked_from_elsewhere_is_quantized_too(tmp_path):
    """A folder whose text encoder is a symbolic link to an LLM folder (as benchmarks/ builds them, to share one
    copy): its files are followed, not skipped."""
    source = tmp_path / "linked"
    source.mkdir()
    for entry in (FIXTURES / "zimage-tiny").iterdir():
        (source / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    assert main([str(source), str(tmp_path / "out"), "--bits", "4", "--group-size", "32"]) == 0
    quantized_source = resolve(str(tmp_path / "out"))
    assert quantized_source.quantization("text_encoder") and quantized_source.quantization("transformer")
    assert (tmp_path / "out" / "text_encoder" / "config.json").is_file()

def held_bytes(folder: Path) -> int:
    """MLX's active memory that loading the pipeline at ``folder`` adds."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    pipeline = load_pipeline(str(folder))
    gc.collect()
    held = mx.get_active_memory() - before
    del pipeline
    return held


def loaded_tensors(folder: Path, component: str) -> dict:
    """The component's tensors that loading the pipeline reads: the text encoder's layers past the deepest hidden
    state the model conditions on are left in the files."""
    source = resolve(str(folder))
    if component != "text_encoder":
        return source.tensors(component)
    return encoder_tensors(source, pipeline_class(source, detect(source).architecture).text_hidden_states)


def weight_bytes(folder: Path) -> int:
    return sum(v.nbytes for c in ("text_encoder", "transformer", "vae") for v in loaded_tensors(folder, c).values())


def unpacked_on_cuda_bytes(folder: Path) -> int:
    """What the weights MLX's CUDA kernels cannot multiply packed (_core.cuda_runs_packed) add in memory on CUDA,
    where they are unpacked at load: their dequantized size (bf16 for the float modes, the scales' dtype for
    affine, as mx.dequantize) less their packed weight, scales and biases. 0 elsewhere."""
    if not (mx.default_device() == mx.gpu and mx.cuda.is_available()):
        return 0
    source, extra = resolve(str(folder)), 0
    for component in ("transformer", "text_encoder"):
        tensors = loaded_tensors(folder, component)
        for name, params in source.quantization(component).items():
            if name not in tensors:
                continue
            packed = tensors[name]
            columns = packed.shape[-1] * 32 // params.bits
            if _core.cuda_runs_packed(columns, params.group_size):
                continue
            stored = [packed, tensors[name + "_scale"]] + [tensors[name + s] for s in ("_qbias", "_global_scale")
                                                              if name + s in tensors]
            dtype = stored[1].dtype if params.mode == "affine" else mx.bfloat16
            extra += packed.size // packed.shape[-1] * columns * dtype.size - sum(t.nbytes for t in stored)
    return extra


@pytest.mark.parametrize("fixture, recipe", [("zimage-tiny", "int4-g32"), ("flux2-klein-tiny", "nvfp4")])
def test_weights_stay_packed_in_memory(tmp_path, fixture, recipe):
    """What the pipeline holds beyond its weights (rope tables, the VAE's float32 copies) does not depend on
    quantization, so the memory quantization saves must be the file bytes it saves (on CUDA less what the layers it
    cannot run packed grow by: the tiny models' widths, 32 to 96 columns, are all of them there)."""
    folder, float_folder = quantized(tmp_path, fixture, recipe), FIXTURES / fixture
    saved_in_files = weight_bytes(float_folder) - weight_bytes(folder)
    assert saved_in_files > 0.3 * weight_bytes(float_folder)  # the quantization packed most of the bytes
    expected = saved_in_files - unpacked_on_cuda_bytes(folder)
    saved_in_memory = held_bytes(float_folder) - held_bytes(folder)
    assert abs(saved_in_memory - expected) <= 0.1 * saved_in_files, (saved_in_memory, expected, saved_in_files)


def test_mixed_is_for_llms(tmp_path, capsys):
    assert main([str(FIXTURES / "zimage-tiny"), str(tmp_path / "out"), "--bits", "4", "--mixed"]) == 1
    assert "--mixed is for LLMs" in capsys.readouterr().err


def test_a_quantized_image_model_is_refused(tmp_path, capsys):
    folder = quantized(tmp_path, "flux2-klein-tiny", "nvfp4")
    assert main([str(folder), str(tmp_path / "again"), "--bits", "4"]) == 1
    assert "is quantized already" in capsys.readouterr().err


def test_an_unquantized_mflux_folder_is_a_source_too(tmp_path):
    """mflux-save without -q: mflux's names and layouts in, a diffusers folder out."""
    mflux = write_mflux_folder("zimage-tiny", tmp_path / "mflux", None, dtype=mx.float32)
    assert main([str(mflux), str(tmp_path / "q"), "--bits", "8", "--group-size", "32"]) == 0
    ours = load_pipeline(str(tmp_path / "q"))
    assert type(ours.source).__name__ == "DirectorySource" and ours.source.quantization("transformer")
    float_twin = dequantized_image_folder(ours.source, FIXTURES / "zimage-tiny", tmp_path / "float")
    a = np.asarray(ours.generate(PROMPT, **REQUEST, guidance=0.0)).astype(int)
    b = np.asarray(load_pipeline(str(float_twin)).generate(PROMPT, **REQUEST, guidance=0.0)).astype(int)
    assert np.abs(a - b).max() <= 1
