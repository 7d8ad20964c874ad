"""The step cache over HTTP: `"cache": {"threshold": x}` on /completion image requests (and on OpenAI's
image routes as an extra field), its counts on the final line, and bad values refused with a 400 naming
the field. A real runner serving the tiny Z-Image fixture; its first-block residual changes by about 1x
from step to step (diffusers' default threshold is 0.05), so the thresholds that skip steps here are large.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import openai
import pytest
from image_helpers import generate_with, png_of, post
from PIL import Image

from mlxrunner.launcher import Runner

FIXTURES = Path(__file__).parents[1] / "fixtures"
BASE = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 12, "seed": 7, "guidance": 0}


@pytest.fixture(scope="module")
def runner():
    with Runner.start(str(FIXTURES / "zimage-tiny"), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def uncached(runner) -> dict:
    return generate_with(runner, BASE)[1]


def pixels(final: dict) -> np.ndarray:
    return np.asarray(png_of(final).convert("RGB"))


def test_no_cache_field_means_no_caching_and_no_counts(uncached):
    assert "cache" not in uncached


def test_the_final_line_counts_computed_and_skipped_steps(runner, uncached):
    progress, final = generate_with(runner, BASE, cache={"threshold": 1.5})
    assert final["cache"]["threshold"] == 1.5
    assert final["cache"]["computed"] + final["cache"]["skipped"] == 12
    assert final["cache"]["computed"] >= 1 and final["cache"]["skipped"] >= 1, final["cache"]
    assert [line["step"] for line in progress] == list(range(13))  # every step still reports progress
    assert not np.array_equal(pixels(final), pixels(uncached))


def test_a_threshold_of_0_is_off(runner, uncached):
    _, final = generate_with(runner, BASE, cache={"threshold": 0})
    assert "cache" not in final
    assert np.array_equal(pixels(final), pixels(uncached))


def test_a_threshold_that_skips_nothing_makes_the_uncached_image(runner, uncached):
    _, final = generate_with(runner, BASE, cache={"threshold": 1e-6})
    assert (final["cache"]["computed"], final["cache"]["skipped"]) == (12, 0)
    assert np.array_equal(pixels(final), pixels(uncached))


@pytest.mark.parametrize("cache, message", [
    (0.1, 'field "cache" must be an object'),
    ([0.1], 'field "cache" must be an object'),
    ({}, 'field "cache.threshold" is required'),
    ({"threshold": "0.1"}, 'field "cache.threshold" must be a number'),
    ({"threshold": -0.1}, 'field "cache.threshold" must be between 0 and 10'),
    ({"threshold": 11}, 'field "cache.threshold" must be between 0 and 10'),
    ({"threshold": 0.1, "kind": "teacache"}, 'field "cache.kind" is not known'),
])
def test_bad_cache_values_are_400_naming_the_field(runner, cache, message):
    status, _, raw = post(runner, {**BASE, "cache": cache})
    assert status == 400 and message in json.loads(raw)["error"], raw
    _, final = generate_with(runner, {**BASE, "steps": 1, "width": 32, "height": 32})
    assert png_of(final).size == (32, 32)


def client_for(runner: Runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{runner.host}:{runner.port}/v1", api_key="unused", max_retries=0)


def test_openai_generations_take_the_cache_as_an_extra_field(runner):
    extra = {"seed": 7, "steps": 12, "guidance_scale": 0}
    answer = client_for(runner).images.generate(prompt=BASE["prompt"], size="64x64",
                                                extra_body={**extra, "cache": {"threshold": 1.5}})
    _, final = generate_with(runner, BASE, cache={"threshold": 1.5})
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
    assert np.array_equal(image, pixels(final))
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(runner).images.generate(prompt="a cat", extra_body={"cache": {"threshold": -1}})
    assert caught.value.param == "cache.threshold"


def test_openai_edits_take_the_cache_as_the_client_flattens_it():
    with Runner.start(str(FIXTURES / "flux2-klein-base-tiny"), timeout=120) as klein:
        out = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(out, format="PNG")
        reference = out.getvalue()
        extra = {"seed": 5, "steps": 6, "cache": {"threshold": 10}}
        answer = client_for(klein).images.edit(image=("ref.png", reference, "image/png"), prompt="make it blue",
                                               extra_body=extra)
        _, final = generate_with(klein, {"prompt": "make it blue", "steps": 6, "seed": 5, "cache": {"threshold": 10},
                                         "images": [base64.b64encode(reference).decode()]})
        assert final["cache"] == {"threshold": 10, "computed": 2, "skipped": 10}  # CFG: two calls a step
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
        assert np.array_equal(image, pixels(final))
        with pytest.raises(openai.BadRequestError) as caught:
            client_for(klein).images.edit(image=("ref.png", reference, "image/png"), prompt="x",
                                          extra_body={"cache": {"threshold": "lots"}})
        assert caught.value.param == "cache.threshold"
