"""FLUX.2 Klein served: editing over HTTP and `mlxrunner generate --image`, on the tiny fixtures.

Real runner subprocesses (mlxrunner.launcher.Runner) on 127.0.0.1 serve the distilled fixture
(default 4 steps; guidance and negative_prompt reported "ignored") and the base fixture (true CFG).
Request `images` are base64 files, decoded by the server as imagegen.images.decode_image does (EXIF
orientation applied, alpha composited on white, broken or hostile files refused with a 400 naming
`images[i]`); the pipeline then floors each reference to multiples of 16 and centre-crops it, and
the first one sets any missing output side. Outputs are kept small and steps at 1-2, so the file
runs in well under a minute on two busy cores (each prompt's text encoding costs about a second).
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ready_status, run_cli
from image_helpers import generate_with, pixels, png_of, post, same
from PIL import Image, ImageOps

from mlxrunner.imagegen import load_pipeline
from mlxrunner.imagegen.images import decode_image
from mlxrunner.launcher import Runner
from mlxrunner.request import Limits

FIXTURES = Path(__file__).parents[1] / "fixtures"
DISTILLED = FIXTURES / "flux2-klein-tiny"
BASE_MODEL = FIXTURES / "flux2-klein-base-tiny"
GOLDENS = Path(__file__).parents[1] / "goldens" / "flux2_klein"
REF_A = GOLDENS / "ref_a.png"  # 90x120 RGB: floored and centre-cropped to 80x112
REF_B = GOLDENS / "ref_b.png"  # 150x100 RGBA, EXIF orientation 6: 100x150 upright, 96x144 cropped


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


A64, B64 = b64(REF_A.read_bytes()), b64(REF_B.read_bytes())

# The edit most tests vary one field of: no width/height, so the size comes from ref_a.
EDIT = {"prompt": "make the fox red", "steps": 2, "seed": 5, "images": [A64]}
# Text to image, for what does not need a reference.
T2I = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 1, "seed": 3}


# --- HTTP helpers (as tests/api/test_image_api.py) -------------------------------------------------


def generate(runner: Runner, base: dict = EDIT, **fields) -> tuple[list[dict], dict]:
    return generate_with(runner, base, **fields)


def file_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A ~90-byte PNG whose IHDR claims width x height (1-bit grey) and whose IDAT holds only 4
    rows: judging it needs the header alone; decoding it would mean a width x height canvas."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled():
    with Runner.start(str(DISTILLED), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def base_runner():
    with Runner.start(str(BASE_MODEL), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def edit_one(distilled) -> tuple[list[dict], dict]:
    """EDIT over HTTP: (progress lines, final line)."""
    return generate(distilled)


@pytest.fixture(scope="module")
def edit_two(distilled) -> dict:
    """EDIT with ref_a then ref_b (another size, RGBA, EXIF-rotated): the final line."""
    return generate(distilled, images=[A64, B64])[1]


@pytest.fixture(scope="module")
def api():
    return load_pipeline(str(DISTILLED))


# --- editing over HTTP ------------------------------------------------------------------------------


def test_health_says_imagegen(distilled):
    assert ready_status(distilled.health()) == {"status": "ok", "mode": "imagegen", "model": str(DISTILLED)}


def test_one_reference_image_sets_the_size_and_the_stream_is_complete(edit_one):
    progress, final = edit_one
    assert progress == [{"step": i, "total": 2, "done": False} for i in range(3)]
    # 90x120 floored to multiples of 16 and centre-cropped: 80x112.
    assert (final["width"], final["height"], final["steps"], final["seed"]) == (80, 112, 2, 5)
    image = png_of(final)
    assert image.size == (80, 112) and image.mode == "RGB"
    assert image.text["prompt"] == EDIT["prompt"] and image.text["seed"] == "5"
    assert "ignored" not in final  # the images were used, not ignored
    assert pixels(final).std() > 0


def test_the_reference_image_changes_the_image(distilled, edit_one):
    _, plain = generate(distilled, images=None, width=80, height=112)
    assert png_of(plain).size == (80, 112) and "ignored" not in plain
    assert not same(plain, edit_one[1])


def test_the_same_edit_and_seed_twice_gives_the_same_pixels(distilled, edit_one):
    _, again = generate(distilled)
    assert again["seed"] == 5 and (again["width"], again["height"]) == (80, 112)
    assert same(again, edit_one[1])


def test_a_second_reference_of_another_size_changes_the_image(edit_one, edit_two):
    assert (edit_two["width"], edit_two["height"]) == (80, 112)  # the first image sets the size
    assert png_of(edit_two).size == (80, 112)
    assert "ignored" not in edit_two
    assert not same(edit_two, edit_one[1])


def test_exif_orientation_and_alpha_are_applied_before_the_reference_is_used(distilled):
    # ref_b is stored 150x100 with orientation 6: upright it is 100x150, cropped 96x144.
    _, tagged = generate(distilled, images=[B64], steps=1)
    assert (tagged["width"], tagged["height"]) == (96, 144) and png_of(tagged).size == (96, 144)
    # The same picture rotated and composited on white by hand, with no EXIF and no alpha.
    with Image.open(REF_B) as image:
        upright = ImageOps.exif_transpose(image).convert("RGBA")
    assert upright.size == (100, 150) and upright.getextrema()[3][0] < 255  # it has transparency
    flat = Image.alpha_composite(Image.new("RGBA", upright.size, (255, 255, 255, 255)), upright).convert("RGB")
    out = io.BytesIO()
    flat.save(out, format="PNG")
    _, by_hand = generate(distilled, images=[b64(out.getvalue())], steps=1)
    assert same(tagged, by_hand)


def test_a_16_bit_greyscale_reference_is_the_same_picture_as_its_8_bit_copy(distilled):
    # A left-to-right ramp 0..252; as 16-bit, each value v is v * 257 (exactly v in 8 bits).
    ramp = np.tile((np.arange(64) * 4).astype(np.uint8), (64, 1))
    eight, sixteen = io.BytesIO(), io.BytesIO()
    Image.fromarray(ramp, "L").save(eight, format="PNG")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(sixteen, format="PNG")
    assert Image.open(io.BytesIO(sixteen.getvalue())).mode == "I;16"
    _, from_eight = generate(distilled, images=[b64(eight.getvalue())], steps=1)
    _, from_sixteen = generate(distilled, images=[b64(sixteen.getvalue())], steps=1)
    decoded = np.asarray(decode_image(sixteen.getvalue(), "images[0]", Limits()))[0, ::16, 0]
    assert same(from_eight, from_sixteen), f"the 16-bit ramp decodes as {decoded} (expected [0 64 128 192])"


@pytest.mark.parametrize("case", ["one", "two"])
def test_http_gives_the_python_apis_pixels(case, edit_one, edit_two, api):
    final = edit_one[1] if case == "one" else edit_two
    paths = [REF_A] if case == "one" else [REF_A, REF_B]
    references = [decode_image(path.read_bytes(), f"images[{i}]", Limits()) for i, path in enumerate(paths)]
    result = api.run(EDIT["prompt"], images=references, seed=EDIT["seed"], steps=EDIT["steps"])
    assert (result.width, result.height) == (final["width"], final["height"]) == (80, 112)
    assert np.array_equal(np.asarray(result.image), pixels(final))


# --- the distilled model's fields ---------------------------------------------------------------------


def test_distilled_reports_guidance_and_negative_prompt_ignored_and_they_change_nothing(distilled, edit_one):
    _, steered = generate(distilled, guidance=3.5, negative_prompt="blurry, low quality")
    assert sorted(steered["ignored"]) == ["guidance", "negative_prompt"]
    assert png_of(steered).text["guidance"] == "1"  # what was used, not what was asked
    assert same(steered, edit_one[1])


def test_distilled_default_steps_is_4(distilled):
    progress, final = generate(distilled, T2I, steps=None)
    assert progress == [{"step": i, "total": 4, "done": False} for i in range(5)]
    assert final["steps"] == 4 and png_of(final).text["steps"] == "4"
    assert png_of(final).size == (64, 64) and "ignored" not in final


# --- the base model: true CFG ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_cfg(base_runner) -> dict:
    """T2I with guidance 3 (CFG on, negative "") on the base fixture: the final line."""
    _, final = generate(base_runner, T2I, guidance=3.0)
    assert "ignored" not in final
    return final


def test_base_guidance_changes_the_image_and_is_not_ignored(base_runner, base_cfg):
    _, other = generate(base_runner, T2I, guidance=5.5)
    assert "ignored" not in other and png_of(other).text["guidance"] == "5.5"
    assert not same(other, base_cfg)


def test_base_negative_prompt_changes_the_image_and_is_not_ignored(base_runner, base_cfg):
    _, negative = generate(base_runner, T2I, guidance=3.0, negative_prompt="blurry, low quality")
    assert "ignored" not in negative
    assert not same(negative, base_cfg)


# --- bad reference images ---------------------------------------------------------------------------


@pytest.mark.parametrize("images, pattern", [
    ([b64(b"this is plain text, not a picture " * 4)], r'"images\[0\]" is not an image'),
    ([A64, b64(REF_A.read_bytes()[:2700])], r'"images\[1\]" is damaged or truncated'),
    ([b64(png_bytes(32, 32))], r'"images\[0\]" is 32x32; each side must be at least 64 px'),
    ([A64, b64(png_bytes(640, 64))], r'"images\[1\]" is 640x64; the aspect ratio must be at most 8:1'),
    ([A64] * 5, r'field "images" has 5 images; the maximum is 4'),
    # Header-only judgements: decoding these would succeed (PIL fills the missing rows).
    ([b64(bomb_png(20000, 20000))],
     r'"images\[0\]" (is 20000x20000; the largest side allowed is 4096|could not be opened: .*decompression bomb)'),
    ([A64, b64(bomb_png(8192, 8192))], r'"images\[1\]" is 8192x8192; the largest side allowed is 4096 px'),
], ids=["not-an-image", "truncated", "too-small", "aspect-10", "five-images", "bomb-20000", "bomb-8192"])
def test_a_bad_reference_image_is_400_naming_it_and_the_runner_keeps_serving(distilled, images, pattern):
    status, ctype, raw = post(distilled, {**EDIT, "images": images})
    assert status == 400 and ctype is not None and ctype.startswith("application/json"), (status, raw[:300])
    error = json.loads(raw)["error"]
    assert re.search(pattern, error), error
    assert distilled.health()["status"] == "ok"


def test_after_the_bad_images_the_same_edit_gives_the_same_pixels(distilled, edit_one):
    _, final = generate(distilled)
    assert same(final, edit_one[1])


# --- an Ollama store copy ---------------------------------------------------------------------------


def test_an_ollama_store_copy_makes_the_same_edit(tmp_path, edit_one):
    from ollama_store import import_directory

    import_directory(tmp_path / "models", "x/flux2-klein-tiny:latest", DISTILLED)
    env = {"OLLAMA_MODELS": str(tmp_path / "models")}
    with Runner.start("x/flux2-klein-tiny:latest", env=env, timeout=120) as runner:
        expected = {"status": "ok", "mode": "imagegen", "model": "x/flux2-klein-tiny:latest"}
        assert ready_status(runner.health()) == expected
        progress, final = generate(runner)
    assert [p["step"] for p in progress] == [0, 1, 2]
    assert (final["seed"], final["steps"], final["width"], final["height"]) == (5, 2, 80, 112)
    assert "ignored" not in final
    assert same(final, edit_one[1])


# --- mlxrunner generate --image ------------------------------------------------------------------------


def cli_generate(out: Path, *images: Path):
    args = ["generate", "--model", str(DISTILLED), "--prompt", EDIT["prompt"], "--steps", str(EDIT["steps"]),
            "--seed", str(EDIT["seed"]), "-o", str(out)]
    for image in images:
        args += ["--image", str(image)]
    return run_cli(*args)


def test_generate_with_an_image_takes_its_size_and_makes_the_runners_pixels(tmp_path, edit_one):
    out = tmp_path / "out.png"
    result = cli_generate(out, REF_A)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: 80x112, 2 steps, seed 5, ")
    assert "ignored" not in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (80, 112)
    assert np.array_equal(file_pixels(out), pixels(edit_one[1]))


def test_generate_with_two_images_makes_the_runners_pixels(tmp_path, edit_two):
    out = tmp_path / "two.png"
    result = cli_generate(out, REF_A, REF_B)
    assert result.returncode == 0, result.stderr
    assert ": 80x112, 2 steps, seed 5, " in result.stdout
    assert np.array_equal(file_pixels(out), pixels(edit_two))


def test_generate_with_a_truncated_image_fails_naming_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(REF_A.read_bytes()[:2700])
    out = tmp_path / "out.png"
    result = cli_generate(out, REF_A, broken)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and str(broken) in line and "truncated" in line, line
    assert not out.exists()
