"""The public Python API of image generation (mlxrunner.imagegen), on the tiny Z-Image fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlxrunner.errors import ModelError
from mlxrunner.imagegen import Cancelled, load_pipeline
from mlxrunner.imagegen.pipeline import resolve_size

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zimage-tiny"
SMALL = dict(width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(FIXTURE))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_generate_returns_an_rgb_pil_image_of_the_size_asked(pipe):
    image = pipe.generate("a red fox", width=96, height=64, steps=1, seed=1)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (96, 64)


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = pipe.generate("a red fox", seed=5, **SMALL)
    assert np.array_equal(pixels(a), pixels(pipe.generate("a red fox", seed=5, **SMALL)))
    assert not np.array_equal(pixels(a), pixels(pipe.generate("a red fox", seed=6, **SMALL)))


def test_seed_zero_is_a_seed_and_no_seed_is_random_and_reported(pipe):
    assert pipe.run("x", seed=0, **SMALL).seed == 0
    first, second = pipe.run("x", **SMALL), pipe.run("x", **SMALL)
    assert first.seed != second.seed
    again = pipe.run("x", seed=first.seed, **SMALL)
    assert np.array_equal(pixels(first.image), pixels(again.image))


def test_negative_int64_seed_works(pipe):
    assert pipe.run("x", seed=-(2**63), **SMALL).seed == -(2**63)


@pytest.mark.parametrize("field, values", [
    ("steps", (1, 3)),
    ("guidance", (1.0, 4.0)),
    ("negative_prompt", ("blurry", "a dog")),
])
def test_each_field_changes_the_image(pipe, field, values):
    base = dict(SMALL, seed=3, guidance=2.0)
    a = pipe.generate("a red fox", **{**base, field: values[0]})
    b = pipe.generate("a red fox", **{**base, field: values[1]})
    assert not np.array_equal(pixels(a), pixels(b))


def test_prompt_changes_the_image(pipe):
    assert not np.array_equal(pixels(pipe.generate("a red fox", seed=1, **SMALL)),
                              pixels(pipe.generate("a blue whale", seed=1, **SMALL)))


def test_guidance_zero_turns_cfg_off_and_reports_the_negative_prompt_ignored(pipe):
    with_negative = pipe.run("a fox", seed=2, guidance=0.0, negative_prompt="blurry", **SMALL)
    without = pipe.run("a fox", seed=2, guidance=0.0, **SMALL)
    assert with_negative.ignored == ["negative_prompt"] and without.ignored == []
    assert np.array_equal(pixels(with_negative.image), pixels(without.image))


def test_reference_images_are_ignored_by_z_image(pipe):
    ref = Image.new("RGB", (64, 64), (200, 10, 10))
    result = pipe.run("a fox", seed=2, images=[ref], **SMALL)
    assert result.ignored == ["images"]
    assert np.array_equal(pixels(result.image), pixels(pipe.generate("a fox", seed=2, **SMALL)))


def test_base_model_defaults(pipe):
    assert not pipe.distilled and pipe.defaults == {"steps": 50, "guidance": 5.0}


def test_turbo_is_recognised_by_name_and_ignores_cfg_fields(tmp_path):
    turbo_dir = tmp_path / "Z-Image-Turbo-tiny"
    shutil.copytree(FIXTURE, turbo_dir)
    turbo = load_pipeline(str(turbo_dir))
    assert turbo.distilled and turbo.defaults["steps"] == 9
    plain = turbo.run("a fox", seed=4, **SMALL)
    steered = turbo.run("a fox", seed=4, guidance=7.0, negative_prompt="blurry", **SMALL)
    assert steered.ignored == ["negative_prompt", "guidance"] and steered.guidance == 0.0
    assert np.array_equal(pixels(plain.image), pixels(steered.image))
    totals = []
    turbo.run("a fox", seed=4, width=64, height=64, progress=lambda step, total: totals.append(total))
    assert set(totals) == {9}


def test_is_distilled_in_model_index_wins_over_the_name(tmp_path):
    folder = tmp_path / "zimage-turbo-but-not"
    shutil.copytree(FIXTURE, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
    assert not load_pipeline(str(folder)).distilled


@pytest.mark.parametrize("asked, made", [((70, 100), (64, 96)), ((None, None), (1024, 1024)), ((0, 48), (1024, 48)),
                                         ((5, 17), (16, 16))])
def test_sizes_round_down_to_multiples_of_16(asked, made):
    assert resolve_size(*asked, multiple=16, default=1024, max_pixels=2048 * 2048) == made


def test_too_many_pixels_is_an_error_not_a_shrink(pipe):
    with pytest.raises(ValueError, match="limit"):
        pipe.run("x", width=4096, height=4096, steps=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=-1), "steps"), (dict(steps=1001), "steps"), (dict(seed=2**63), "seed"), (dict(width=-16), "width"),
])
def test_bad_arguments_name_the_argument(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.run("x", **{**SMALL, **kwargs})


def test_latents_set_the_size_and_are_checked(pipe):
    latents = np.random.default_rng(0).standard_normal((1, 16, 6, 10)).astype(np.float32)
    result = pipe.run("a fox", steps=1, latents=latents)
    assert (result.width, result.height) == (80, 48)
    with pytest.raises(ValueError, match="latents"):
        pipe.run("a fox", width=64, height=64, steps=1, latents=latents)
    with pytest.raises(ValueError, match="NaN"):
        pipe.run("a fox", steps=1, latents=np.full((1, 16, 6, 10), np.nan, np.float32))


def test_progress_reports_every_step_and_false_cancels(pipe):
    seen = []
    pipe.run("a fox", seed=1, progress=lambda step, total: seen.append((step, total)), **SMALL)
    assert seen == [(0, 2), (1, 2), (2, 2)]
    with pytest.raises(Cancelled):
        pipe.run("a fox", seed=1, progress=lambda step, total: step < 1, **SMALL)


def test_release_text_encoder_gives_the_same_image(tmp_path):
    kept = load_pipeline(str(FIXTURE))
    released = load_pipeline(str(FIXTURE), release_text_encoder=True)
    a = released.generate("a fox", seed=9, **SMALL)
    assert released.text_encoder._decoder is None  # freed after encoding
    b = released.generate("a fox", seed=9, **SMALL)  # and reloaded for the next prompt
    assert np.array_equal(pixels(a), pixels(b))
    assert np.array_equal(pixels(a), pixels(kept.generate("a fox", seed=9, **SMALL)))


def test_encode_prompt_is_numpy_float32(pipe):
    embedding = pipe.encode_prompt("a fox")
    assert isinstance(embedding, np.ndarray) and embedding.dtype == np.float32 and embedding.shape[1] == 48


def test_timings_and_png_text(pipe):
    result = pipe.run("ünïcödé fox", seed=11, **SMALL)
    assert set(result.timings) == {"encode", "denoise", "decode", "total"}
    assert all(v >= 0 for v in result.timings.values())
    text = result.png_text("ünïcödé fox")
    assert text["prompt"] == "ünïcödé fox" and text["seed"] == "11" and text["steps"] == "2"


# --- bad model folders: load errors that name what is wrong -----------------------------------


def broken_copy(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken-zimage"
    shutil.copytree(FIXTURE, folder)
    edit(folder)
    return folder


def test_missing_vae_config_is_named(tmp_path):
    folder = broken_copy(tmp_path, lambda f: (f / "vae" / "config.json").unlink())
    with pytest.raises(ModelError, match="vae/config.json"):
        load_pipeline(str(folder))


def test_wrong_transformer_shape_names_the_tensor(tmp_path):
    def edit(folder):
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, "n_layers": 3}))

    with pytest.raises(ModelError, match=r"layers\.2\."):
        load_pipeline(str(broken_copy(tmp_path, edit)))


def test_text_encoder_and_transformer_widths_must_agree(tmp_path):
    def edit(folder):
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, "cap_feat_dim": 64}))

    with pytest.raises(ModelError, match="cap_feat_dim"):
        load_pipeline(str(broken_copy(tmp_path, edit)))


def test_missing_tokenizer_is_named(tmp_path):
    folder = broken_copy(tmp_path, lambda f: shutil.rmtree(f / "tokenizer"))
    with pytest.raises(ModelError, match="tokenizer"):
        load_pipeline(str(folder))


def test_not_an_image_model(tmp_path):
    with pytest.raises(ModelError, match="not an image model"):
        load_pipeline(str(Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"))


def test_ollama_style_fluxpipeline_label_on_a_z_image_folder_loads_as_z_image(tmp_path):
    folder = tmp_path / "labelled-flux"
    shutil.copytree(FIXTURE, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    relabelled = load_pipeline(str(folder))
    assert relabelled.architecture == "ZImagePipeline"
    assert np.array_equal(pixels(relabelled.generate("a fox", seed=1, **SMALL)),
                          pixels(load_pipeline(str(FIXTURE)).generate("a fox", seed=1, **SMALL)))


def test_a_real_flux1_pipeline_is_refused_by_name(tmp_path):
    folder = tmp_path / "flux1"
    shutil.copytree(FIXTURE, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ModelError, match="FLUX.1"):
        load_pipeline(str(folder))
