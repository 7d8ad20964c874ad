"""/v1/images/generations and /v1/images/edits from the real `openai` client, against real runners.

Z-Image's tiny fixture generates; FLUX.2 Klein's edits, with the reference images sent as the client sends
them (multipart/form-data: `image` for one file, repeated `image[]` for several, every other field as text).
Each image is compared with the one /completion makes from the same request, so the OpenAI route is known
to run the same job. Sizes stay at 32-64 pixels and steps at 1-2.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import openai
import pytest
from image_helpers import generate_with
from PIL import Image

from mlxrunner.launcher import Runner

FIXTURES = Path(__file__).parents[1] / "fixtures"
ZIMAGE = FIXTURES / "zimage-tiny"
FLUX2 = FIXTURES / "flux2-klein-tiny"


def client_for(runner: Runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{runner.host}:{runner.port}/v1", api_key="unused", max_retries=0)


def pixels_of(b64: str) -> np.ndarray:
    data = base64.b64decode(b64, validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_file(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def zimage_runner():
    with Runner.start(str(ZIMAGE), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def flux2_runner():
    with Runner.start(str(FLUX2), timeout=120) as runner:
        yield runner


def test_generate_makes_the_image_completion_makes(zimage_runner):
    client = client_for(zimage_runner)
    answer = client.images.generate(prompt="a red fox", size="64x32",
                                    extra_body={"seed": 7, "steps": 2, "guidance_scale": 0})
    assert answer.created > 1_700_000_000 and len(answer.data) == 1
    image = pixels_of(answer.data[0].b64_json)
    assert image.shape == (32, 64, 3)
    _, final = generate_with(zimage_runner, {"prompt": "a red fox", "width": 64, "height": 32, "steps": 2,
                                             "seed": 7, "guidance": 0})
    assert np.array_equal(image, pixels_of(final["image"]))


def test_n_images_use_consecutive_seeds(zimage_runner):
    client = client_for(zimage_runner)
    answer = client.images.generate(prompt="a cat", n=2, size="32x32", extra_body={"seed": 10, "steps": 1})
    assert len(answer.data) == 2
    second = client.images.generate(prompt="a cat", size="32x32", extra_body={"seed": 11, "steps": 1})
    assert np.array_equal(pixels_of(answer.data[1].b64_json), pixels_of(second.data[0].b64_json))
    assert not np.array_equal(pixels_of(answer.data[0].b64_json), pixels_of(answer.data[1].b64_json))


def decoded(b64: str, expected_format: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert image.format == expected_format
    return np.asarray(image.convert("RGB"))


def test_output_format_jpeg_and_webp_hold_the_png_image(zimage_runner):
    client = client_for(zimage_runner)
    request = {"prompt": "a red fox", "size": "64x48", "extra_body": {"seed": 3, "steps": 2}}
    png = client.images.generate(**request)
    assert png.output_format == "png"
    reference = pixels_of(png.data[0].b64_json)
    webp = client.images.generate(**request, output_format="webp")
    assert webp.output_format == "webp"
    assert np.array_equal(decoded(webp.data[0].b64_json, "WEBP"), reference)  # at 100, lossless
    best = client.images.generate(**request, output_format="jpeg")
    rough = client.images.generate(**request, output_format="jpeg", output_compression=20)
    best_error = np.abs(decoded(best.data[0].b64_json, "JPEG").astype(int) - reference).mean()
    rough_error = np.abs(decoded(rough.data[0].b64_json, "JPEG").astype(int) - reference).mean()
    assert best_error < 3 and rough_error > best_error
    assert len(rough.data[0].b64_json) < len(best.data[0].b64_json)


def test_an_edit_takes_output_format_as_a_form_field(flux2_runner):
    answer = client_for(flux2_runner).images.edit(image=png_file(64, 64, (200, 30, 30)), prompt="blue",
                                                  output_format="jpeg", output_compression=50,
                                                  extra_body={"seed": 1, "steps": 1})
    assert decoded(answer.data[0].b64_json, "JPEG").shape == (64, 64, 3)


@pytest.mark.parametrize("fields, param", [
    ({"response_format": "url"}, "response_format"),
    ({"n": 5}, "n"),
    ({"size": "big"}, "size"),
    ({"size": "9000x9000"}, "size"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
    ({"output_compression": 50}, "output_compression"),
    ({"background": "transparent"}, "background"),
])
def test_bad_image_fields_are_400s_naming_the_field(zimage_runner, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(zimage_runner).images.generate(prompt="a cat", **fields)
    assert caught.value.param == param


def test_chat_on_an_image_model_is_a_400_naming_the_image_route(zimage_runner):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(zimage_runner).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/images/generations" in caught.value.message


def test_a_model_that_does_not_edit_says_so(zimage_runner):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(zimage_runner).images.edit(image=png_file(64, 64, (200, 30, 30)), prompt="make it blue")
    assert "does not edit" in caught.value.message


def test_edit_with_one_image_makes_what_completion_makes(flux2_runner):
    reference = png_file(96, 64, (200, 30, 30))
    answer = client_for(flux2_runner).images.edit(image=("ref.png", reference, "image/png"), prompt="make it blue",
                                                  extra_body={"seed": 5, "steps": 2})
    image = pixels_of(answer.data[0].b64_json)
    assert image.shape == (64, 96, 3)  # no size: the reference image's
    _, final = generate_with(flux2_runner, {"prompt": "make it blue", "steps": 2, "seed": 5,
                                            "images": [base64.b64encode(reference).decode()]})
    assert np.array_equal(image, pixels_of(final["image"]))


def test_edit_with_several_images_and_text_fields(flux2_runner):
    references = [("a.png", png_file(64, 64, (200, 30, 30)), "image/png"),
                  ("b.png", png_file(64, 64, (30, 30, 200)), "image/png")]
    answer = client_for(flux2_runner).images.edit(image=references, prompt="mix them", n=2, size="32x32",
                                                  extra_body={"seed": 1, "steps": 1})
    assert [pixels_of(d.b64_json).shape for d in answer.data] == [(32, 32, 3), (32, 32, 3)]


def test_edit_without_an_image_is_a_400(flux2_runner):
    runner = flux2_runner
    import urllib.error
    import urllib.request

    boundary = "x-boundary"
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--{boundary}--\r\n'.encode()
    request = urllib.request.Request(f"http://{runner.host}:{runner.port}/v1/images/edits", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 400
