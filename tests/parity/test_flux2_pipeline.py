"""The Python API of FLUX.2 Klein (mlxrunner.imagegen), on the tiny distilled and base fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from image_helpers import reference_pixels
from PIL import Image

from mlxrunner.errors import ModelError
from mlxrunner.imagegen import Cancelled, load_pipeline
from mlxrunner.imagegen.flux2_klein import Flux2KleinPipeline

FIXTURES = Path(__file__).parents[1] / "fixtures"
DISTILLED = FIXTURES / "flux2-klein-tiny"
BASE = FIXTURES / "flux2-klein-base-tiny"
GOLDENS = Path(__file__).parents[1] / "goldens" / "flux2_klein"
SMALL = dict(width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(DISTILLED))


@pytest.fixture(scope="module")
def base():
    return load_pipeline(str(BASE))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_loads_as_klein_with_defaults(pipe, base):
    assert isinstance(pipe, Flux2KleinPipeline) and pipe.distilled and pipe.defaults == {"steps": 4, "guidance": 1.0}
    assert not base.distilled and base.defaults == {"steps": 50, "guidance": 4.0}


def test_generate_returns_an_rgb_pil_image_of_the_size_asked(pipe):
    image = pipe.generate("a red fox", width=96, height=64, steps=1, seed=1)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (96, 64)


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = pipe.generate("a red fox", seed=5, **SMALL)
    assert np.array_equal(pixels(a), pixels(pipe.generate("a red fox", seed=5, **SMALL)))
    assert not np.array_equal(pixels(a), pixels(pipe.generate("a red fox", seed=6, **SMALL)))


def test_no_seed_is_random_and_reported(pipe):
    first, second = pipe.run("x", **SMALL), pipe.run("x", **SMALL)
    assert first.seed != second.seed
    assert np.array_equal(pixels(first.image), pixels(pipe.run("x", seed=first.seed, **SMALL).image))


@pytest.mark.parametrize("field, values", [("steps", (1, 3)), ("prompt", ("a red fox", "a blue whale"))])
def test_each_field_changes_the_image(pipe, field, values):
    def make(value):
        args = dict(SMALL, seed=3)
        if field == "prompt":
            return pipe.generate(value, **args)
        return pipe.generate("a red fox", **{**args, field: value})

    assert not np.array_equal(pixels(make(values[0])), pixels(make(values[1])))


def test_distilled_ignores_guidance_and_negative_prompt(pipe):
    plain = pipe.run("a fox", seed=4, **SMALL)
    steered = pipe.run("a fox", seed=4, guidance=7.0, negative_prompt="blurry", **SMALL)
    assert plain.ignored == [] and steered.ignored == ["negative_prompt", "guidance"]
    assert steered.guidance == 1.0
    assert np.array_equal(pixels(plain.image), pixels(steered.image))
    totals = []
    pipe.run("a fox", seed=4, width=64, height=64, progress=lambda step, total: totals.append(total))
    assert set(totals) == {4}


@pytest.mark.parametrize("field, values", [("guidance", (2.0, 5.0)), ("negative_prompt", ("blurry", "a dog"))])
def test_base_model_cfg_fields_change_the_image(base, field, values):
    args = dict(SMALL, seed=3, guidance=3.0)
    a = base.generate("a red fox", **{**args, field: values[0]})
    b = base.generate("a red fox", **{**args, field: values[1]})
    assert not np.array_equal(pixels(a), pixels(b))


def test_base_model_guidance_one_turns_cfg_off_and_reports_the_negative_prompt_ignored(base):
    with_negative = base.run("a fox", seed=2, guidance=1.0, negative_prompt="blurry", **SMALL)
    without = base.run("a fox", seed=2, guidance=1.0, **SMALL)
    assert with_negative.ignored == ["negative_prompt"] and without.ignored == []
    assert np.array_equal(pixels(with_negative.image), pixels(without.image))
    # The default negative is "": not the same as no CFG.
    assert not np.array_equal(pixels(without.image), pixels(base.generate("a fox", seed=2, guidance=4.0, **SMALL)))
    assert base.run("a fox", seed=2, **SMALL).guidance == 4.0


def test_missing_is_distilled_means_base(tmp_path):
    folder = tmp_path / "klein-no-flag"
    shutil.copytree(DISTILLED, folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["is_distilled"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert not load_pipeline(str(folder)).distilled


# --- editing ----------------------------------------------------------------------------------


def test_one_reference_image_sets_the_size_and_changes_the_image(pipe):
    ref = gradient(90, 120)
    edited = pipe.run("make it red", seed=1, steps=2, images=[ref])
    assert (edited.width, edited.height) == (80, 112) and edited.image.size == (80, 112)  # floored, cropped
    assert edited.ignored == []
    plain = pipe.run("make it red", seed=1, steps=2, width=80, height=112)
    assert not np.array_equal(pixels(edited.image), pixels(plain.image))
    # One side given: the other still comes from the image.
    assert pipe.run("x", seed=1, steps=1, width=64, images=[ref]).image.size == (64, 112)


def test_two_reference_images_and_their_order_matter(pipe):
    a, b = gradient(64, 64, 1), gradient(96, 80, 2)
    one = pipe.generate("mix", seed=1, images=[a], **SMALL)
    two = pipe.generate("mix", seed=1, images=[a, b], **SMALL)
    swapped = pipe.run("mix", seed=1, steps=2, images=[b, a])
    assert not np.array_equal(pixels(one), pixels(two))
    assert swapped.image.size == (96, 80)  # the first image's size
    assert not np.array_equal(pixels(two), pixels(pipe.generate("mix", seed=1, images=[b, a], **SMALL)))


def test_alpha_is_composited_on_white(pipe):
    clear = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    np.testing.assert_array_equal(reference_pixels(clear), reference_pixels(white))
    assert np.array_equal(pixels(pipe.generate("x", seed=1, images=[clear], **SMALL)),
                          pixels(pipe.generate("x", seed=1, images=[white], **SMALL)))


def test_large_reference_images_are_shrunk_to_about_a_megapixel_then_cropped():
    pixels_ = reference_pixels(gradient(1100, 1000))
    assert pixels_.shape == (1, 3, 976, 1072)  # LANCZOS to 1073x976, cropped to multiples of 16
    assert reference_pixels(gradient(1024, 1024)).shape == (1, 3, 1024, 1024)  # not above the limit


def test_reference_preprocessing_matches_the_goldens_crop():
    image = Image.open(GOLDENS / "ref_a.png")  # 90x120 -> crop box (5, 4, 85, 116)
    expected = np.asarray(image.convert("RGB"))[4:116, 5:85].astype(np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(reference_pixels(image)[0].transpose(1, 2, 0), expected, atol=1e-6)


@pytest.mark.parametrize("image, message", [
    (Image.new("RGB", (63, 128)), "at least 64"),
    (Image.new("RGB", (64, 520)), "aspect ratio"),
    ("not an image", "PIL image"),
])
def test_bad_reference_images_are_refused_by_name(pipe, image, message):
    good = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match=message) as info:
        pipe.run("x", images=[good, image], **SMALL)
    assert "images[1]" in str(info.value)


# --- shared request rules -----------------------------------------------------------------------


def test_latents_set_the_size_and_are_checked(pipe):
    latents = np.random.default_rng(0).standard_normal((1, 16, 3, 5)).astype(np.float32)
    result = pipe.run("a fox", steps=1, latents=latents)
    assert (result.width, result.height) == (80, 48)
    assert result.latents.shape == (1, 4, 6, 10)  # the VAE's input, as diffusers' output_type="latent"
    with pytest.raises(ValueError, match="latents"):
        pipe.run("a fox", width=64, height=64, steps=1, latents=latents)
    with pytest.raises(ValueError, match="NaN"):
        pipe.run("a fox", steps=1, latents=np.full((1, 16, 3, 5), np.nan, np.float32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=-1), "steps"), (dict(seed=2**63), "seed"), (dict(width=-16), "width"),
    (dict(width=4096, height=4096), "limit"),
])
def test_bad_arguments_name_the_argument(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.run("x", **{**SMALL, **kwargs})


def test_progress_reports_every_step_and_false_cancels(pipe):
    seen = []
    pipe.run("a fox", seed=1, progress=lambda step, total: seen.append((step, total)), **SMALL)
    assert seen == [(0, 2), (1, 2), (2, 2)]
    with pytest.raises(Cancelled):
        pipe.run("a fox", seed=1, progress=lambda step, total: step < 1, **SMALL)


def test_release_text_encoder_gives_the_same_image(pipe):
    released = load_pipeline(str(DISTILLED), release_text_encoder=True)
    a = released.generate("a fox", seed=9, **SMALL)
    assert released.text_encoder._decoder is None
    assert np.array_equal(pixels(a), pixels(released.generate("a fox", seed=9, **SMALL)))
    assert np.array_equal(pixels(a), pixels(pipe.generate("a fox", seed=9, **SMALL)))


def test_encode_prompt_is_numpy_float32_over_all_512_positions(pipe):
    embedding = pipe.encode_prompt("a fox")
    assert isinstance(embedding, np.ndarray) and embedding.dtype == np.float32 and embedding.shape == (512, 96)


def test_timings_and_png_text(pipe):
    result = pipe.run("ünïcödé fox", seed=11, **SMALL)
    assert set(result.timings) == {"encode", "denoise", "decode", "total"}
    assert result.png_text("ünïcödé fox")["steps"] == "2"


# --- bad model folders ----------------------------------------------------------------------------


def broken_copy(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken-klein"
    shutil.copytree(DISTILLED, folder)
    edit(folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_text_encoder_and_transformer_widths_must_agree(tmp_path):
    folder = broken_copy(tmp_path, lambda f: edit_json(f / "transformer" / "config.json", joint_attention_dim=64))
    with pytest.raises(ModelError, match="joint_attention_dim"):
        load_pipeline(str(folder))


def test_wrong_transformer_depth_names_the_tensor(tmp_path):
    folder = broken_copy(tmp_path, lambda f: edit_json(f / "transformer" / "config.json", num_single_layers=3))
    with pytest.raises(ModelError, match=r"single_transformer_blocks\.2\."):
        load_pipeline(str(folder))


def test_missing_vae_config_is_named(tmp_path):
    folder = broken_copy(tmp_path, lambda f: (f / "vae" / "config.json").unlink())
    with pytest.raises(ModelError, match="vae/config.json"):
        load_pipeline(str(folder))
