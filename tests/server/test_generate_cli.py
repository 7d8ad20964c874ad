"""`mlxrunner generate`: one image from the command line, written as a PNG with its recipe in text chunks."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from mlxrunner.launcher import Runner

ZIMAGE = Path(__file__).parents[1] / "fixtures" / "zimage-tiny"
QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"
PROMPT = "a tiny fox \u2014 caf\u00e9 \u72d0\u72f8"
ARGS = ("--width", "64", "--height", "96", "--steps", "2", "--seed", "3")


def generate(out: Path, *extra: str, prompt: str = PROMPT):
    result = run_cli("generate", "--model", str(ZIMAGE), prompt, "-o", str(out), *ARGS, *extra)
    assert result.returncode == 0, result.stderr
    return result


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The reference run: (output path, CompletedProcess)."""
    out = tmp_path_factory.mktemp("generate") / "out.png"
    return out, generate(out)


def test_generate_writes_a_png_of_the_requested_size_with_its_recipe(first):
    out, _ = first
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 96) and image.mode == "RGB"
        text = dict(image.text)
    assert text["prompt"] == PROMPT and text["seed"] == "3" and text["steps"] == "2"
    assert (text["width"], text["height"]) == ("64", "96")
    assert pixels(out).std() > 0  # not a blank canvas


def test_stdout_reports_size_steps_and_seed_and_stderr_shows_progress(first):
    out, result = first
    assert result.stdout.startswith(f"wrote {out}: 64x96, 2 steps, seed 3, ")
    assert "ignored" not in result.stdout
    assert "loading" in result.stderr
    denoising = [line for line in result.stderr.splitlines() if line.startswith("denoising")]
    assert denoising and denoising[-1].split()[-2] == "2/2", result.stderr


def test_the_runner_makes_the_same_image_as_the_command(first, tmp_path):
    out, _ = first
    with Runner.start(str(ZIMAGE), timeout=120) as runner:
        final = list(runner.complete({"prompt": PROMPT, "width": 64, "height": 96, "steps": 2, "seed": 3}))[-1]
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(final["image"]))
    assert np.array_equal(pixels(served), pixels(out))
    with Image.open(served) as a, Image.open(out) as b:
        assert a.text == b.text  # the same recipe in the same text chunks


def test_the_same_command_twice_gives_the_same_pixels(first, tmp_path):
    out, _ = first
    again = tmp_path / "again.png"
    generate(again)
    assert np.array_equal(pixels(out), pixels(again))


@pytest.mark.parametrize("extra", [("--negative-prompt", "blurry, low quality"), ("--guidance", "1.5")])
def test_negative_prompt_and_guidance_change_the_image(first, tmp_path, extra):
    out, _ = first
    other = tmp_path / "other.png"
    generate(other, *extra)
    assert pixels(other).shape == (96, 64, 3)
    assert not np.array_equal(pixels(out), pixels(other))


def test_a_random_seed_is_printed_and_reproduces_the_image(tmp_path):
    a = tmp_path / "a.png"
    result = run_cli("generate", "--model", str(ZIMAGE), "-p", "x", "-o", str(a), "--width", "64", "--height", "64",
                     "--steps", "1")
    assert result.returncode == 0, result.stderr
    seed = int(result.stdout.split(", seed ")[1].split(",")[0])
    with Image.open(a) as image:
        assert image.text["seed"] == str(seed)
    b = tmp_path / "b.png"  # the same prompt from stdin: `echo x | mlxrunner generate ...`
    result = run_cli("generate", "--model", str(ZIMAGE), "-o", str(b), "--width", "64", "--height", "64",
                     "--steps", "1", "--seed", str(seed), stdin="x\n")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(pixels(a), pixels(b))


def test_a_distilled_model_defaults_to_9_steps_and_reports_ignored_fields(tmp_path):
    # Not "turbo" by name: model_index.json's is_distilled makes it Turbo (no CFG, 9 steps).
    folder = tmp_path / "zimage-distilled-tiny"
    shutil.copytree(ZIMAGE, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    out = tmp_path / "turbo.png"
    result = run_cli("generate", "--model", str(folder), "-p", "x", "-o", str(out), "--width", "64", "--height", "64",
                     "--seed", "1", "--negative-prompt", "blurry", "--guidance", "3")
    assert result.returncode == 0, result.stderr
    assert ": 64x64, 9 steps, seed 1, " in result.stdout
    assert result.stdout.rstrip().endswith("(ignored: negative_prompt, guidance)")
    with Image.open(out) as image:
        assert image.text["steps"] == "9" and image.text["guidance"] == "0"


def test_image_that_is_not_an_image_fails_naming_the_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n" * 10)
    out = tmp_path / "out.png"
    result = run_cli("generate", "--model", str(ZIMAGE), "--prompt", "x", "-o", str(out), "--image", str(notes))
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert line.startswith("Error: ") and str(notes) in line and "not an image" in line
    assert not out.exists()


def test_image_that_does_not_exist_fails_naming_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    result = run_cli("generate", "--model", str(ZIMAGE), "--prompt", "x", "-o", str(tmp_path / "o.png"),
                     "--image", str(missing))
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert line.startswith("Error: --image ") and str(missing) in line


def test_an_embedding_model_fails_before_loading(tmp_path):
    out = tmp_path / "out.png"
    result = run_cli("generate", "--model", "all-minilm", "--prompt", "x", "-o", str(out))
    assert result.returncode == 1
    assert last_line(result.stderr) == ("Error: all-minilm is an embedding model: generate takes image models and "
                                        "LLMs (use mlxrunner embed)")
    assert "loading" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("model, flag, message", [
    (str(ZIMAGE), ("--temperature", "0"), f"--temperature: for an LLM, and {ZIMAGE} is an image model"),
    (str(QWEN3), ("-o", "x.png"), f"--output: for an image model, and {QWEN3} is an LLM"),
])
def test_a_flag_for_the_other_kind_of_model_is_a_usage_error(model, flag, message):
    result = run_cli("generate", "--model", model, "x", *flag)
    assert result.returncode == 2
    assert last_line(result.stderr) == f"mlxrunner generate: error: {message}"


def test_missing_prompt_is_a_usage_error(tmp_path):
    result = run_cli("generate", "--model", str(ZIMAGE), "-o", str(tmp_path / "out.png"))
    assert result.returncode == 2
    assert "usage: mlxrunner generate" in result.stderr and "--prompt" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_a_prompt_given_twice_is_a_usage_error(tmp_path):
    result = run_cli("generate", "--model", str(ZIMAGE), "x", "--prompt", "y", "-o", str(tmp_path / "out.png"))
    assert result.returncode == 2
    assert last_line(result.stderr) == ("mlxrunner generate: error: give the prompt once: as PROMPT or as "
                                        "--prompt, not both")
