"""Image mode over HTTP: real runner subprocesses serving the tiny diffusers-made Z-Image fixture.

The wire contract is docs/protocol.md: progress lines {"step", "total", "done": false}
for i = 0..N, then {"image": <base64 PNG>, "seed", "width", "height", "steps", "done": true, "timings",
"ignored"?}. Every request field either changes the image or is named in "ignored". Sizes are kept tiny
(64x64, 64x96) and steps at 1-3 so the file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import ready_status, run_cli
from image_helpers import generate_with, png_of, post, same
from PIL import Image

from mlxrunner.launcher import Runner, RunnerError

ZIMAGE = Path(__file__).parents[1] / "fixtures" / "zimage-tiny"

# The request most tests vary one field of.
BASE = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2, "seed": 7}
# The cheapest good request: one step, no CFG, 32x32.
GOOD = {"prompt": "still serving", "width": 32, "height": 32, "steps": 1, "guidance": 0, "seed": 1}
# Long enough that finishing it would take many seconds (200 steps at 1024x1024, ~25 s here; at 512x512 a faster
# build finished it within a shutdown's grace).
LONG = {"prompt": "a long job", "width": 1024, "height": 1024, "steps": 200, "seed": 1}


@pytest.fixture(scope="module")
def image_runner():
    with Runner.start(str(ZIMAGE), timeout=120) as runner:
        yield runner


def error_of(runner: Runner, body, path: str = "/completion") -> tuple[int, str]:
    status, _, raw = post(runner, body, path)
    return status, json.loads(raw)["error"]


def generate(runner: Runner, **fields) -> tuple[list[dict], dict]:
    return generate_with(runner, BASE, **fields)


def png_b64(width: int = 64, height: int = 64) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def baseline(image_runner) -> dict:
    """The final line for BASE: what the one-field variations are compared against."""
    return generate(image_runner)[1]


# --- health and routes ------------------------------------------------------------------------------


def test_health_reports_memory_and_the_cache_is_given_back_once_idle(image_runner):
    generate(image_runner, seed=11)
    right_after = image_runner.health()["memory"]  # the worker waits 1 s idle before releasing
    deadline = time.monotonic() + 15
    while (memory := image_runner.health()["memory"])["cache_bytes"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert right_after["cache_bytes"] > 0, right_after  # the run's buffers stay cached between requests...
    assert memory["cache_bytes"] == 0, memory  # ...until the runner has been idle a moment
    assert memory["active_bytes"] > 0 and memory["peak_bytes"] >= memory["active_bytes"], memory


def test_health_says_imagegen(image_runner):
    assert ready_status(image_runner.health()) == {"status": "ok", "mode": "imagegen", "model": str(ZIMAGE)}


@pytest.mark.parametrize("path, body", [
    ("/embedding", {"content": "hello"}),
    ("/tokenize", {"content": "hello"}),
    ("/detokenize", {"tokens": [1, 2]}),
])
def test_routes_the_image_mode_does_not_serve_are_409_naming_the_mode(image_runner, path, body):
    status, _, raw = post(image_runner, body, path)
    assert status == 409
    error = json.loads(raw)["error"]
    assert f"{path} is not served by this runner" in error and "imagegen" in error and "/completion" in error


def test_openai_routes_the_image_mode_does_not_serve_are_400_naming_the_route_to_use(image_runner):
    # 400, not 409: the openai client retries a 409, and asking again cannot help.
    status, _, raw = post(image_runner, {"input": "hello"}, "/v1/embeddings")
    assert status == 400
    error = json.loads(raw)["error"]
    assert "/v1/embeddings does not serve" in error["message"] and "imagegen" in error["message"]
    assert "/v1/images/generations" in error["message"]


# --- the stream ----------------------------------------------------------------------------------


def test_stream_is_ndjson_progress_lines_then_a_final_image_line(image_runner):
    status, ctype, raw = post(image_runner, {**BASE, "steps": 3, "width": 64, "height": 96})
    assert status == 200 and ctype == "application/x-ndjson"
    assert raw.endswith(b"\n")
    parts = raw.split(b"\n")[:-1]
    assert all(part.strip() for part in parts), "blank line in the stream"
    lines = [json.loads(part) for part in parts]
    progress, final = lines[:-1], lines[-1]
    assert progress == [{"step": i, "total": 3, "done": False} for i in range(4)]
    assert final["done"] is True
    assert {"image", "seed", "width", "height", "steps", "done", "timings"} <= set(final)
    assert (final["seed"], final["width"], final["height"], final["steps"]) == (7, 64, 96, 3)
    assert png_of(final).size == (64, 96)
    timings = final["timings"]
    assert set(timings) == {"encode_ms", "denoise_ms", "decode_ms", "total_ms"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in timings.values())
    assert timings["denoise_ms"] > 0 and timings["decode_ms"] > 0
    assert timings["total_ms"] >= timings["denoise_ms"] + timings["decode_ms"] - 1
    assert final.get("ignored", []) == []  # every field of this request had an effect


def test_png_text_chunks_carry_prompt_seed_and_steps(image_runner):
    prompt = "un renard roux \u2014 caf\u00e9, \u72d0\u72f8 \U0001F98A"
    _, final = generate(image_runner, prompt=prompt, seed=-12345, steps=1)
    text = png_of(final).text
    assert text["prompt"] == prompt
    assert text["seed"] == "-12345" and final["seed"] == -12345
    assert text["steps"] == "1"


# --- every field has an effect or is reported as ignored ---------------------------------------


def test_prompt_changes_the_image(image_runner, baseline):
    _, other = generate(image_runner, prompt="a blue whale in the deep sea")
    assert not same(other, baseline)


def test_width_and_height_set_the_size_rounded_down_to_16(image_runner, baseline):
    _, tall = generate(image_runner, width=64, height=96)
    assert png_of(tall).size == (64, 96) and (tall["width"], tall["height"]) == (64, 96)
    _, rounded = generate(image_runner, width=70, height=79)
    assert png_of(rounded).size == (64, 64) and (rounded["width"], rounded["height"]) == (64, 64)
    assert same(rounded, baseline)  # 70x79 is made as 64x64, exactly


def test_steps_change_the_progress_total_and_the_image(image_runner, baseline):
    progress, three = generate(image_runner, steps=3)
    assert [p["total"] for p in progress] == [3] * 4 and [p["step"] for p in progress] == [0, 1, 2, 3]
    assert three["steps"] == 3
    assert not same(three, baseline)
    progress, _ = generate(image_runner, steps=1)
    assert progress == [{"step": 0, "total": 1, "done": False}, {"step": 1, "total": 1, "done": False}]


def test_same_seed_same_pixels_other_seed_other_pixels(image_runner, baseline):
    _, again = generate(image_runner)
    assert same(again, baseline) and again["seed"] == 7
    _, other = generate(image_runner, seed=8)
    assert not same(other, baseline) and other["seed"] == 8


@pytest.mark.parametrize("seed", [0, -1, 2**63 - 1, -(2**63)])
def test_any_int64_seed_is_valid_and_echoed(image_runner, seed):
    _, final = generate(image_runner, seed=seed, steps=1)
    assert final["seed"] == seed and png_of(final).text["seed"] == str(seed)


def test_seed_0_is_a_seed_not_random(image_runner):
    _, a = generate(image_runner, seed=0, steps=1)
    _, b = generate(image_runner, seed=0, steps=1)
    _, c = generate(image_runner, seed=1, steps=1)
    assert a["seed"] == b["seed"] == 0 and same(a, b) and not same(a, c)


def test_absent_seed_is_random_echoed_and_reproducible(image_runner):
    _, first = generate(image_runner, seed=None, steps=1)
    _, second = generate(image_runner, seed=None, steps=1)
    assert isinstance(first["seed"], int) and -(2**63) <= first["seed"] < 2**63
    assert first["seed"] != second["seed"] and not same(first, second)
    _, replay = generate(image_runner, seed=first["seed"], steps=1)
    assert replay["seed"] == first["seed"] and same(replay, first)


def test_negative_prompt_changes_the_image_when_guidance_is_on(image_runner, baseline):
    # The base model's default guidance is 5.0: CFG is on, with "" as the default negative.
    _, negative = generate(image_runner, negative_prompt="blurry, low quality")
    assert not same(negative, baseline) and negative.get("ignored", []) == []
    _, empty = generate(image_runner, negative_prompt="")
    assert same(empty, baseline)


def test_negative_prompt_is_ignored_when_guidance_is_0(image_runner):
    _, plain = generate(image_runner, guidance=0)
    _, negative = generate(image_runner, guidance=0, negative_prompt="blurry, low quality")
    assert negative["ignored"] == ["negative_prompt"] and plain.get("ignored", []) == []
    assert same(negative, plain)


def test_guidance_changes_the_image_and_defaults_to_5(image_runner, baseline):
    _, explicit = generate(image_runner, guidance=5.0)
    assert same(explicit, baseline)
    _, low = generate(image_runner, guidance=1.5)
    _, off = generate(image_runner, guidance=0)
    assert not same(low, baseline) and not same(off, baseline) and not same(low, off)
    assert png_of(low).text["guidance"] == "1.5"


def test_images_are_ignored_by_zimage(image_runner, baseline):
    _, final = generate(image_runner, images=[png_b64()])
    assert final["ignored"] == ["images"]
    assert same(final, baseline)


def test_options_are_ignored_in_image_mode(image_runner, baseline):
    _, final = generate(image_runner, options={"temperature": 0.1, "num_predict": 3})
    assert final["ignored"] == ["options"]
    assert same(final, baseline)


# --- bad input -----------------------------------------------------------------------------------


def _not_an_image_b64() -> str:
    return base64.b64encode(b"this is plain text, not a picture" * 4).decode()


@pytest.mark.parametrize("body, message", [
    ("{", "not valid JSON"),
    ("", "request body is empty"),
    ("[1, 2]", "must be a JSON object"),
    ({"width": 64, "height": 64}, 'field "prompt" is required'),
    ({"prompt": 5}, 'field "prompt"'),
    ({**BASE, "width": "64"}, 'field "width"'),
    ({**BASE, "height": 64.5}, 'field "height"'),
    ({**BASE, "width": -64}, 'field "width"'),
    ({**BASE, "steps": 201}, 'field "steps"'),
    ({**BASE, "steps": "2"}, 'field "steps"'),
    ({**BASE, "width": 2048, "height": 2064}, '"width" x "height"'),
    ({**BASE, "width": 4096, "height": 1040}, '"width" x "height"'),
    ({**BASE, "width": 5000, "height": None}, '"width" x "height"'),  # 5000 x the default 1024
    ({**BASE, "seed": 2**63}, 'field "seed"'),
    ({**BASE, "seed": -(2**63) - 1}, 'field "seed"'),
    ({**BASE, "seed": "7"}, 'field "seed"'),
    ({**BASE, "images": ["not base64 at all!"]}, 'field "images[0]" is not valid base64'),
    ({**BASE, "images": "abc"}, 'field "images"'),
    ({**BASE, "images": [_not_an_image_b64()]}, '"images[0]" is not an image'),
    ({**BASE, "images": [png_b64(32, 32)]}, '"images[0]" is 32x32'),
    ({**BASE, "images": [png_b64()] * 5}, 'field "images" has 5 images; the maximum is 4'),
    ({**BASE, "images": [png_b64(4160, 64)]}, '"images[0]" is 4160x64; the largest side allowed is 4096'),
    ({**BASE, "images": [png_b64(64, 640)]}, '"images[0]" is 64x640; the aspect ratio'),
    ({**BASE, "guidance": -1}, 'field "guidance"'),
    ({**BASE, "guidance": "high"}, 'field "guidance"'),
    ({**BASE, "negative_prompt": 3}, 'field "negative_prompt"'),
    ({**BASE, "options": "fast"}, 'field "options"'),
])
def test_bad_input_is_400_naming_the_field_and_the_runner_keeps_serving(image_runner, body, message):
    status, error = error_of(image_runner, body)
    assert status == 400 and message in error, error
    _, final = generate(image_runner, **GOOD)
    assert png_of(final).size == (32, 32)


def test_get_on_completion_is_405(image_runner):
    conn = http.client.HTTPConnection(image_runner.host, image_runner.port, timeout=30)
    try:
        conn.request("GET", "/completion", headers={"Accept": "application/json"})
        response = conn.getresponse()
        assert response.status == 405 and "use POST" in json.loads(response.read())["error"]
    finally:
        conn.close()


# --- Turbo --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def turbo_runner(tmp_path_factory):
    """A Turbo copy of the fixture: Turbo by its folder name (server/test_generate_cli.py covers is_distilled)."""
    folder = tmp_path_factory.mktemp("turbo") / "zimage-turbo-tiny"
    shutil.copytree(ZIMAGE, folder)
    with Runner.start(str(folder), timeout=120) as runner:
        yield runner


def test_turbo_default_steps_is_9(turbo_runner):
    progress, final = generate(turbo_runner, steps=None)
    assert progress == [{"step": i, "total": 9, "done": False} for i in range(10)]
    assert final["steps"] == 9 and png_of(final).text["steps"] == "9"


def test_turbo_ignores_negative_prompt_and_guidance(turbo_runner):
    _, plain = generate(turbo_runner)
    _, both = generate(turbo_runner, negative_prompt="blurry, low quality", guidance=3.5)
    assert plain.get("ignored", []) == []
    assert sorted(both["ignored"]) == ["guidance", "negative_prompt"]
    assert same(both, plain)
    _, zero = generate(turbo_runner, guidance=0)
    assert zero["ignored"] == ["guidance"] and same(zero, plain)


def test_turbo_is_the_same_network_without_cfg(turbo_runner, image_runner):
    _, turbo = generate(turbo_runner)
    _, base_without_cfg = generate(image_runner, guidance=0)
    assert same(turbo, base_without_cfg)


# --- cancellation and shutdown ----------------------------------------------------------------------


def wait_for_stderr(runner: Runner, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(runner.stderr_tail):
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in runner stderr: {list(runner.stderr_tail)[-5:]}")


def test_client_disconnect_mid_stream_cancels_the_job(image_runner):
    conn = http.client.HTTPConnection(image_runner.host, image_runner.port, timeout=60)
    conn.request("POST", "/completion", body=json.dumps(LONG), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.readline()) == {"step": 0, "total": 200, "done": False}
    assert json.loads(response.readline())["step"] == 1  # it is in the denoising loop
    started = time.monotonic()
    assert image_runner.health()["status"] == "ok"  # /health never waits for a job
    assert time.monotonic() - started < 1
    conn.sock.shutdown(socket.SHUT_RDWR)  # close() alone keeps the fd open while the response reads it
    conn.close()
    start = time.monotonic()
    wait_for_stderr(image_runner, "(completion) cancelled: client disconnected")
    # The 200-step job is gone: a new request is served at once, not after it.
    _, final = generate(image_runner, **GOOD)
    assert png_of(final).size == (32, 32)
    assert time.monotonic() - start < 5
    assert image_runner.health()["status"] == "ok"


def test_sigterm_mid_generation_sends_an_error_line_and_exits_0_within_5_s():
    runner = Runner.start(str(ZIMAGE), timeout=120)
    lines, errors = [], []

    def client():
        try:
            for obj in runner.complete(LONG, timeout=60):
                lines.append(obj)
        except RunnerError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=client)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(lines) >= 2, "no progress line before SIGTERM"
        start = time.monotonic()
        runner.process.send_signal(signal.SIGTERM)
        code = runner.process.wait(10)
        elapsed = time.monotonic() - start
        thread.join(10)
    finally:
        runner.close()
    assert code == 0 and elapsed < 5
    progress, final = lines[:-1], lines[-1]
    assert progress and all(p["done"] is False and p["total"] == 200 for p in progress)
    assert progress[-1]["step"] < 200  # the generation was still running when the signal came
    assert final == {"error": "the runner is shutting down", "content": "error: the runner is shutting down",
                     "done": True}
    assert errors == ["the runner is shutting down"]


# --- other sources of the same model, and broken ones ------------------------------------------------


def test_an_ollama_store_copy_makes_the_same_image(tmp_path, baseline):
    from ollama_store import import_directory

    import_directory(tmp_path / "models", "x/zimage-tiny:latest", ZIMAGE)
    env = {"OLLAMA_MODELS": str(tmp_path / "models")}
    with Runner.start("x/zimage-tiny:latest", env=env, timeout=120) as runner:
        assert ready_status(runner.health()) == {"status": "ok", "mode": "imagegen", "model": "x/zimage-tiny:latest"}
        _, final = generate(runner)
    assert (final["seed"], final["steps"], final["width"], final["height"]) == (7, 2, 64, 64)
    assert same(final, baseline)


def _truncate_transformer(folder: Path) -> str:
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return "transformer/diffusion_pytorch_model.safetensors"


def _remove_vae_config(folder: Path) -> str:
    (folder / "vae" / "config.json").unlink()
    return "vae/config.json not found"


def test_the_memory_check_uses_ollamas_words_for_image_models():
    result = run_cli("--model", str(ZIMAGE), "--port", "0", env={"MLXRUNNER_MEMORY_LIMIT": "1MB"})
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: insufficient memory for image generation: need 5 MB, have 1 MB"), line


@pytest.mark.parametrize("break_it", [_truncate_transformer, _remove_vae_config])
def test_a_broken_folder_exits_1_naming_what_is_wrong(tmp_path, break_it):
    folder = tmp_path / "zimage-broken"
    shutil.copytree(ZIMAGE, folder)
    expected = break_it(folder)
    result = run_cli("--model", str(folder), "--port", "0")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and expected in line, line
