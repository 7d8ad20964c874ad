"""`"vae_tile"` over HTTP: the VAE's tile side in pixels on /completion image requests (and OpenAI's image
routes as an extra field). Absent, images up to 1024² decode in one pass; 0 forces one pass; n tiles of n
pixels. A real runner serving the tiny Z-Image fixture; the expected tiled image is the in-process pipeline's
decode of the same latents in the same tiles. Bad values are 400s naming the field, and the runner keeps
serving.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import openai
import pytest
from image_helpers import generate_with, pixels, png_of, post, to_uint8
from PIL import Image

from mlxrunner.imagegen import load_pipeline
from mlxrunner.launcher import Runner

FIXTURES = Path(__file__).parents[1] / "fixtures"
BASE = {"prompt": "a lighthouse at dusk", "width": 192, "height": 128, "steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def runner():
    with Runner.start(str(FIXTURES / "zimage-tiny"), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(FIXTURES / "zimage-tiny"))


@pytest.fixture(scope="module")
def by_size(runner) -> dict:
    return generate_with(runner, BASE)[1]


def test_absent_and_0_decode_a_small_image_in_one_pass(runner, pipe, by_size):
    _, one_pass = generate_with(runner, BASE, vae_tile=0)
    assert np.array_equal(pixels(one_pass), pixels(by_size))
    result = pipe.run(BASE["prompt"], width=192, height=128, steps=2, seed=11)
    assert np.array_equal(pixels(by_size), np.asarray(result.image))


def test_a_tile_size_decodes_in_tiles_of_that_many_pixels(runner, pipe, by_size):
    _, tiled = generate_with(runner, BASE, vae_tile=64)
    assert png_of(tiled).size == (192, 128)
    result = pipe.run(BASE["prompt"], width=192, height=128, steps=2, seed=11)
    expected = to_uint8(pipe.vae.decode_float(mx.array(result.latents), tile=64 // 8))
    assert np.array_equal(pixels(tiled), expected)
    assert not np.array_equal(pixels(tiled), pixels(by_size))  # tiling changed the decode, a little
    assert np.abs(pixels(tiled).astype(int) - pixels(by_size)).mean() < 20


@pytest.mark.parametrize("vae_tile, message", [
    ("64", 'field "vae_tile" must be an integer'),
    (-64, 'field "vae_tile" must be between 0 and 2048'),
    (4096, 'field "vae_tile" must be between 0 and 2048'),
    (100, 'field "vae_tile" must be 0 or a multiple of 64'),
])
def test_bad_vae_tile_values_are_400_naming_the_field(runner, vae_tile, message):
    status, _, raw = post(runner, {**BASE, "vae_tile": vae_tile})
    assert status == 400 and message in json.loads(raw)["error"], raw
    _, final = generate_with(runner, {**BASE, "steps": 1, "width": 32, "height": 32})
    assert png_of(final).size == (32, 32)


def test_one_pass_above_the_safe_size_is_refused_before_any_work(runner):
    status, _, raw = post(runner, {**BASE, "width": 2048, "height": 2048, "vae_tile": 0})
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert '"vae_tile": 0' in error and "2048x2048" in error, error


def client_for(runner: Runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{runner.host}:{runner.port}/v1", api_key="unused", max_retries=0)


def test_openai_generations_take_vae_tile_as_an_extra_field(runner):
    answer = client_for(runner).images.generate(prompt=BASE["prompt"], size="192x128",
                                                extra_body={"seed": 11, "steps": 2, "vae_tile": 64})
    _, final = generate_with(runner, BASE, vae_tile=64)
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
    assert np.array_equal(image, pixels(final))
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(runner).images.generate(prompt="a cat", extra_body={"vae_tile": 96})
    assert caught.value.param == "vae_tile"


def test_openai_edits_take_vae_tile_as_a_form_field():
    """FLUX.2 Klein: an edit with vae_tile (a form field; it tiles the reference's encode and the decode) makes
    what /completion makes with it (tests/parity/test_vae_tiled_encode.py checks the encode's tiles)."""
    y, x = np.mgrid[0:256, 0:256] / 40.0
    pattern = np.stack([np.sin(3 * x), np.cos(2 * y), np.sin(x + y)], -1)
    out = io.BytesIO()
    Image.fromarray(((pattern + 1) * 127.5).astype(np.uint8)).save(out, format="PNG")
    reference = out.getvalue()
    body = {"prompt": "make it blue", "steps": 2, "seed": 5, "images": [base64.b64encode(reference).decode()]}
    with Runner.start(str(FIXTURES / "flux2-klein-base-tiny"), timeout=120) as klein:
        answer = client_for(klein).images.edit(image=("ref.png", reference, "image/png"), prompt="make it blue",
                                               extra_body={"seed": 5, "steps": 2, "vae_tile": 128})
        _, tiled = generate_with(klein, body, vae_tile=128)
        _, one_pass = generate_with(klein, body)
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
        assert np.array_equal(image, pixels(tiled))
        assert not np.array_equal(pixels(tiled), pixels(one_pass))
        with pytest.raises(openai.BadRequestError) as caught:
            client_for(klein).images.edit(image=("ref.png", reference, "image/png"), prompt="x",
                                          extra_body={"vae_tile": "big"})
        assert caught.value.param == "vae_tile"
