"""Quantized image models from Ollama stores (both blob eras) run packed (a quantized VAE is dequantized at
load), and draw what the float model holding the exactly dequantized weights draws (within one level of 255).

The stores are the tiny Z-Image and FLUX.2 Klein fixtures imported the way `ollama create -q` did
(tests/ollama_store.py): text encoder and transformer quantized, the VAE float.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ollama_store import image_quantization_names, import_directory
from quant_helpers import dequantized_image_folder

from mlxrunner.imagegen import load_pipeline

FIXTURES = Path(__file__).parents[1] / "fixtures"
# (fixture, era, type): E4 combined blobs with metadata; E1-E3 separate layers typed by model_index.json.
CASES = [("zimage-tiny", "e4", "int8"), ("zimage-tiny", "e4", "nvfp4"), ("zimage-tiny", "e4", "mxfp8"),
         ("zimage-tiny", "e3", "q4"), ("zimage-tiny", "e1", "fp8"),
         ("flux2-klein-tiny", "e4", "int4"), ("flux2-klein-tiny", "e4", "mxfp4"), ("flux2-klein-tiny", "e3", "q8")]
REQUEST = dict(width=64, height=64, steps=2, seed=7)
QUANTIZED = ("text_encoder", "transformer")


@pytest.mark.parametrize("fixture, era, quant_type", CASES, ids=[f"{f}-{e}-{q}" for f, e, q in CASES])
def test_quantized_store_draws_the_dequantized_image(tmp_path, fixture, era, quant_type):
    folder = FIXTURES / fixture
    quantize = image_quantization_names(folder, quant_type)
    import_directory(tmp_path / "models", "x/tiny:q", folder, era=era, quantize=quantize, quant_type=quant_type)
    store = load_pipeline("x/tiny:q", models_dir=str(tmp_path / "models"))
    params = {c: store.source.quantization(c) for c in QUANTIZED}
    assert len(params["transformer"]) >= 4 and len(params["text_encoder"]) >= 4, params
    reference = load_pipeline(str(dequantized_image_folder(store.source, folder, tmp_path / "float")))
    ours = np.asarray(store.generate("a red fox in the snow", **REQUEST)).astype(int)
    theirs = np.asarray(reference.generate("a red fox in the snow", **REQUEST)).astype(int)
    assert np.abs(ours - theirs).max() <= 1


def test_a_quantized_vae_is_dequantized_at_load(tmp_path):
    """mflux quantizes the VAE's attention linears too; our VAE decoder takes dense weights, so they are
    dequantized at load (a few small matrices) and the image is the dequantized float model's."""
    folder = FIXTURES / "zimage-tiny"
    vae = mx.load(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    quantize = image_quantization_names(folder, "mxfp8") | {
        f"vae/{name}" for name, value in vae.items() if name.endswith(".weight") and value.ndim == 2}
    import_directory(tmp_path / "models", "x/tiny:q", folder, quantize=quantize, quant_type="mxfp8")
    store = load_pipeline("x/tiny:q", models_dir=str(tmp_path / "models"))
    assert len(store.source.quantization("vae")) == 8  # to_q, to_k, to_v, to_out.0 of encoder and decoder
    reference = load_pipeline(str(dequantized_image_folder(store.source, folder, tmp_path / "float",
                                                          ("text_encoder", "transformer", "vae"))))
    ours = np.asarray(store.generate("a red fox in the snow", **REQUEST)).astype(int)
    theirs = np.asarray(reference.generate("a red fox in the snow", **REQUEST)).astype(int)
    assert np.abs(ours - theirs).max() <= 1


def test_projections_packed_in_part_run_as_their_runs(tmp_path):
    """q|k|v is one product where the parts are packed alike; where only some are packed (here q and k, not v, in
    FLUX.2's double blocks: the tiny Z-Image's projections are too narrow for int8's groups), each run of alike
    parts is one product and its outputs are cut in place: the image is still the dequantized float model's."""
    folder = FIXTURES / "flux2-klein-tiny"
    left_float = ("to_v.weight", "add_v_proj.weight")
    quantize = {name for name in image_quantization_names(folder, "int8")
                if not (name.startswith("transformer/") and name.endswith(left_float))}
    import_directory(tmp_path / "models", "x/tiny:q", folder, quantize=quantize, quant_type="int8")
    store = load_pipeline("x/tiny:q", models_dir=str(tmp_path / "models"))
    packed = set(store.source.quantization("transformer"))
    assert any(name.endswith("to_q.weight") for name in packed)
    assert not any(name.endswith(left_float) for name in packed)
    reference = load_pipeline(str(dequantized_image_folder(store.source, folder, tmp_path / "float")))
    ours = np.asarray(store.generate("a red fox in the snow", **REQUEST)).astype(int)
    theirs = np.asarray(reference.generate("a red fox in the snow", **REQUEST)).astype(int)
    assert np.abs(ours - theirs).max() <= 1
