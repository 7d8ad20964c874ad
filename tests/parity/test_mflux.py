"""mflux-saved folders (``mflux-save -q``) of the tiny Z-Image and FLUX.2 Klein: detected as the right image
model, read with diffusers' names, run packed (the VAE's quantized attention dequantized at load), and drawing
what the float model holding the exactly dequantized weights draws (within one level of 255).

The folders are written by tests/mflux_writer.py with mflux's own names (tests/fixtures/mflux/*.json,
recorded from mflux's mapping tables by scripts/mflux_names.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mflux_writer import mflux_names, write_mflux_folder
from quant_helpers import dequantized_image_folder

from mlxrunner.detect import detect
from mlxrunner.errors import ModelError
from mlxrunner.imagegen import load_pipeline
from mlxrunner.store import MfluxSource, QuantParams, resolve
from mlxrunner.store.mflux import RENAMES, mflux_to_diffusers

FIXTURES = Path(__file__).parents[1] / "fixtures"
ARCHITECTURES = {"zimage-tiny": "ZImagePipeline", "flux2-klein-tiny": "Flux2KleinPipeline"}
COMPONENTS = ("text_encoder", "transformer", "vae")
REQUEST = dict(width=64, height=64, steps=2, seed=7, guidance=0.0)  # the float twin is not named "turbo"


@pytest.mark.parametrize("fixture", ARCHITECTURES)
def test_reverse_names_invert_mflux_mapping(fixture):
    """Every mflux name of the fixture maps back to the diffusers name mflux's tables took it from."""
    names = mflux_names(fixture)
    for component in COMPONENTS:
        rules = RENAMES[ARCHITECTURES[fixture]][component]
        for diffusers_name, (mflux_name, _) in names[component].items():
            assert mflux_to_diffusers(mflux_name, rules) == diffusers_name, (component, mflux_name)


def images(folder: Path, reference: Path) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.asarray(load_pipeline(str(f)).generate("a red fox in the snow", **REQUEST)).astype(int)
                 for f in (folder, reference))


@pytest.mark.parametrize("fixture", ARCHITECTURES)
@pytest.mark.parametrize("bits", [4, 8])
def test_mflux_folder_draws_the_dequantized_image(tmp_path, fixture, bits):
    """In float32, so that the packed and the dense kernels round alike (bf16 below)."""
    folder = write_mflux_folder(fixture, tmp_path / "mflux", bits, dtype=mx.float32)
    source = resolve(str(folder))
    assert isinstance(source, MfluxSource) and detect(source).architecture == ARCHITECTURES[fixture]
    for component in COMPONENTS:
        params = source.quantization(component)
        assert params and {p.bits for p in params.values()} == {bits}, component
    # The canonical view has the fixture's names and shapes (conv weights back in diffusers' layout).
    fixture_vae = mx.load(str(next((FIXTURES / fixture / "vae").glob("*.safetensors"))))
    ours_vae, packed = source.tensors("vae"), source.quantization("vae")
    assert set(fixture_vae) - set(ours_vae) <= {"bn.num_batches_tracked"}  # a counter mflux does not load
    for name, value in fixture_vae.items():
        if name in ours_vae and name not in packed:
            assert ours_vae[name].shape == value.shape, name
    a, b = images(folder, dequantized_image_folder(source, FIXTURES / fixture, tmp_path / "float", COMPONENTS))
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("fixture", ARCHITECTURES)
def test_mflux_bf16_folder_runs_close_to_the_dequantized_image(tmp_path, fixture):
    """mflux saves bfloat16: there the dequantized weights (scale * q + bias rounded to bf16) are not quite
    what the packed kernels use, which a random tiny model amplifies to some levels here and there; the mean
    stays small (2.1-2.4 levels on the CPU, against 10-20 for the quantization itself)."""
    folder = write_mflux_folder(fixture, tmp_path / "mflux", 4)
    a, b = images(folder, dequantized_image_folder(resolve(str(folder)), FIXTURES / fixture, tmp_path / "float",
                                                   COMPONENTS))
    assert np.abs(a - b).mean() <= 4


def test_group_size_comes_from_the_shapes(tmp_path):
    source = resolve(str(write_mflux_folder("zimage-tiny", tmp_path / "mflux", 4)))
    params = source.quantization("transformer")
    assert params["t_embedder.mlp.0.weight"] == QuantParams(4, 64, "affine")  # 256 columns
    assert params["layers.0.attention.to_q.weight"] == QuantParams(4, 32, "affine")  # 96 columns


def test_distilled_or_base_from_mflux_model_json(tmp_path):
    folder = write_mflux_folder("flux2-klein-tiny", tmp_path / "mflux", 8)
    assert resolve(str(folder)).read_json("model_index.json")["is_distilled"] is True
    info = json.loads((folder / "mflux_model.json").read_text()) | {"model_name": "flux2-klein-base-4b"}
    (folder / "mflux_model.json").write_text(json.dumps(info))
    assert resolve(str(folder)).read_json("model_index.json")["is_distilled"] is False


def test_missing_configs_say_what_to_copy(tmp_path):
    folder = write_mflux_folder("zimage-tiny", tmp_path / "mflux", 4, with_configs=False)
    with pytest.raises(ModelError, match="mflux saves no transformer/config.json, text_encoder/config.json, "
                                         "vae/config.json; copy them .* z-image-turbo"):
        load_pipeline(str(folder))


def rewrite_metadata(folder: Path, component: str, level: str) -> None:
    path = folder / component / "0.safetensors"
    tensors = mx.load(str(path))
    mx.save_safetensors(str(path), tensors, metadata={"quantization_level": level, "mflux_version": "0.24.0"})


@pytest.mark.parametrize("level, message", [
    # 4-bit shapes read at 8 bits: half the columns, so groups of 16 (or 32) that affine does not take.
    ("8", "affine quantization takes group size 32, 64 or 128, not 16"),
    ("7", "affine quantization takes 1, 2, 3, 4, 5, 6 or 8 bits, not 7"),
    ("None", "quantization_level 'None' is false (left unquantized), but the weight is packed"),
])
def test_bad_quantization_level_names_the_tensor(tmp_path, level, message):
    folder = write_mflux_folder("zimage-tiny", tmp_path / "mflux", 4)
    rewrite_metadata(folder, "transformer", level)
    with pytest.raises(ModelError, match="tensor 'all_final_layer.2-1.adaLN_modulation.1.weight'") as error:
        load_pipeline(str(folder))
    assert message in str(error.value)


def test_a_quantization_level_that_is_not_a_number(tmp_path):
    folder = write_mflux_folder("zimage-tiny", tmp_path / "mflux", 4)
    rewrite_metadata(folder, "transformer", "four")
    with pytest.raises(ModelError, match="transformer: .*quantization_level 'four' is not a number of bits"):
        load_pipeline(str(folder))
