"""Each defect of issue 17, as a regression test against a real runner subprocess (127.0.0.1 only).

#6 (cancelling during the VAE decode) and #7 (encoding_format's falsy values, the OpenAI routes' own)
are not here; see docs/testing.md.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest
from conftest import run_cli
from reliability_helpers import (
    LONG_IMAGE,
    QWEN3,
    SMALL_IMAGE,
    ZIMAGE,
    health_seconds,
    open_request,
    post,
    post_json,
    status_of,
    wait_for_log,
)

from mlxrunner.launcher import Runner


@pytest.fixture(scope="module")
def llm_runner():
    with Runner.start(str(QWEN3), timeout=120) as runner:
        yield runner


# --- 1. a huge body is tokenized off the event loop, and a huge prompt is refused from its length ---


def test_health_answers_while_a_huge_body_is_tokenized(llm_runner):
    body = json.dumps({"content": "word " * 4_000_000}).encode()  # 20 MB
    outcome = {}

    def client():
        outcome["status"] = post(llm_runner, "/tokenize", body, timeout=300)[0]

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    time.sleep(1.0)  # the body is in; the tokenizer is at work
    latencies = [health_seconds(llm_runner) for _ in range(20)]
    assert statistics.median(latencies) < 0.1 and max(latencies) < 1.0, latencies
    thread.join(300)
    assert outcome["status"] == 200


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(llm_runner):
    start = time.monotonic()
    status, body = post_json(llm_runner, "/completion", {"prompt": "word " * 4_000_000}, timeout=120)
    assert status == 400 and "bytes" in body["error"] and "context" in body["error"], body
    assert time.monotonic() - start < 10


# --- 3. a client that drops while queued frees its slot at once -----------------------------------


def test_a_dropped_queued_client_frees_its_queue_slot():
    with Runner.start(str(ZIMAGE), extra_args=["--queue-depth", "1"], timeout=120) as runner:
        running = open_request(runner, "/completion", LONG_IMAGE)
        time.sleep(1.0)
        queued = open_request(runner, "/completion", SMALL_IMAGE)
        time.sleep(0.5)
        queued.close()
        wait_for_log(runner, "cancelled: client disconnected")
        next_one = open_request(runner, "/completion", SMALL_IMAGE)
        next_one.settimeout(1.5)
        with pytest.raises(TimeoutError):  # queued behind the running job, not refused with 503
            status_of(next_one)
        running.close()  # the long job is cancelled at its next step; the queued one then runs
        next_one.settimeout(60)
        assert status_of(next_one) == 200
        next_one.close()


# --- 4 and 5. bodies that are not acceptable JSON, and lone surrogates: 400 naming the problem ------


@pytest.mark.parametrize("raw, expected", [
    (b"[" * 10_000 + b"]" * 10_000, "nests"),
    (b'{"prompt": "a", "seed": ' + b"9" * 5_000 + b"}", "digits"),
])
@pytest.mark.parametrize("path", ["/completion", "/tokenize", "/embedding", "/v1/embeddings"])
def test_unacceptable_json_is_a_400_naming_the_problem(llm_runner, path, raw, expected):
    status, content_type, body = post(llm_runner, path, raw)
    assert status == 400 and content_type.startswith("application/json"), body
    assert expected in body.decode()


@pytest.mark.parametrize("path, field_name", [
    ("/tokenize", "content"), ("/completion", "prompt"), ("/embedding", "content"), ("/embedding", "input"),
    ("/v1/embeddings", "input"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(llm_runner, path, field_name):
    raw = b'{"%s": "a\\ud800b"}' % field_name.encode()
    status, _, body = post(llm_runner, path, raw)
    assert status == 400 and field_name in body.decode() and "surrogate" in body.decode(), body


def test_a_lone_surrogate_in_an_image_prompt_is_a_400():
    with Runner.start(str(ZIMAGE), timeout=120) as runner:
        status, body = post_json(runner, "/completion", b'{"prompt": "\\udfff", "width": 32, "height": 32}')
        assert status == 400 and '"prompt"' in body["error"]


# --- 8. signals: a second one is logged, an early one is a clean exit -------------------------------


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM),
                                           (signal.SIGINT, signal.SIGTERM)])
def test_a_second_signal_during_shutdown_is_not_fatal(first, second):
    runner = Runner.start("all-minilm", timeout=120)
    running = open_request(runner, "/embedding", {"input": [f"{i} some text to embed" for i in range(2048)]})
    time.sleep(0.3)
    runner.process.send_signal(first)
    time.sleep(0.05)
    runner.process.send_signal(second)
    code = runner.process.wait(10)
    running.close()
    runner.close()
    assert code == 0, list(runner.stderr_tail)[-5:]


# Recording handlers go in as the package starts importing (early_signals.py), ~20 ms after the
# interpreter starts; before that no Python handler can exist. 0.15 s lands in the package's import of
# MLX; later delays in the imports of the server, the port opening and the model load.
@pytest.mark.parametrize("delay", [0.15, 0.5, 1.0, 2.0])
def test_a_sigterm_while_starting_is_a_clean_exit(delay):
    process = subprocess.Popen([sys.executable, "-m", "mlxrunner", "--model", "all-minilm", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr




def _threads_other_than_main(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]


def _signal_thread(pid: int, tid: int, signum: int) -> None:
    """tgkill(2): hand the signal to one thread of the process, as the kernel may do with a kill(2)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, signum) != 0:  # SYS_tgkill on x86-64
        raise OSError(ctypes.get_errno(), "tgkill")


# The kernel gives a process's signal to any thread that does not block it. Python runs the handler
# on the main thread at its next bytecode, and an idle runner's main thread sleeps in the event loop's
# poll: the signal must wake it (signal.set_wakeup_fd), or the runner never stops.
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="tgkill by syscall number is the x86-64 Linux one")
def test_a_sigterm_delivered_to_another_thread_stops_an_idle_runner():
    runner = Runner.start("all-minilm", timeout=120)
    try:
        time.sleep(1.5)  # the worker has gone idle too: nothing is due to wake the loop
        _signal_thread(runner.process.pid, _threads_other_than_main(runner.process.pid)[0], signal.SIGTERM)
        code = runner.process.wait(10)
    finally:
        runner.close()
    assert code == 0, list(runner.stderr_tail)[-5:]


def test_sigusr1_writes_every_threads_stack_and_the_runner_keeps_serving():
    with Runner.start("all-minilm", timeout=120) as runner:
        runner.process.send_signal(signal.SIGUSR1)
        wait_for_log(runner, "most recent call first")
        assert post(runner, "/embedding", {"input": "still here"})[0] == 200


# A shutdown that wedges (here: a handler that never returns control) is ended by the watchdog the first
# signal arms, with the stacks on stderr, instead of hanging until the parent's SIGKILL.
WEDGED_SHUTDOWN = """
import os, signal, time
from mlxrunner.cli import signals
signals.SHUTDOWN_DEADLINE_S = 1.0
signals.install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(60)
"""


def test_a_wedged_shutdown_is_ended_with_the_stacks_on_stderr():
    result = subprocess.run([sys.executable, "-c", WEDGED_SHUTDOWN], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "Timeout (0:00:01)!" in result.stderr
    assert "time.sleep(60)" in result.stderr or "<module>" in result.stderr


# Which handler is in place when MLX starts loading, for each way the package is started.
HANDLER_WHEN_MLX_LOADS = """
import importlib.abc, signal, sys
sys.orig_argv = sys.argv[1:]
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mlx.core":
            handler = signal.getsignal(signal.SIGTERM)
            print(handler.__name__ if callable(handler) else signal.Handlers(handler).name)
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Spy())
import mlxrunner
"""


@pytest.mark.parametrize("command_line, expected", [
    (["python", "-m", "mlxrunner", "--model", "m", "--port", "0"], "_record"),
    (["python", "/venv/bin/mlxrunner", "--model", "m"], "_record"),
    (["python", "-m", "mlxrunner", "generate", "--model", "m", "hi"], "SIG_DFL"),
    (["python", "-c", "import mlxrunner"], "SIG_DFL"),
])
def test_a_runner_records_signals_before_mlx_loads(command_line, expected):
    result = subprocess.run([sys.executable, "-c", HANDLER_WHEN_MLX_LOADS, *command_line],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == expected, result.stderr

# --- 9. load errors: one short line naming the file and field --------------------------------------


def _bad_llm(tmp_path, config) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in os.listdir(QWEN3):
        (folder / name).symlink_to(QWEN3 / name)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _config(**changes) -> dict:
    return {**json.loads((QWEN3 / "config.json").read_text()), **changes}


@pytest.mark.parametrize("model, env, expected", [
    (lambda tmp: _bad_llm(tmp, [1, 2]), {}, "config.json must hold an object"),
    (lambda tmp: _bad_llm(tmp, _config(vocab_size=2**40)), {}, "vocab_size"),
    (lambda tmp: "x" * 5000, {}, "(5000 characters): File name too long"),
    (lambda tmp: str(QWEN3), {"MLXRUNNER_MEMORY_LIMIT": "1KB"}, "have 1024 bytes"),
])
def test_load_errors_are_one_short_line(tmp_path, model, env, expected):
    result = run_cli("--model", model(tmp_path), "--port", "0", env=env)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("Error: ") and expected in last, last
    assert len(last) < 300, last


# --- minor: shutdown answers a queued request 503, before any stream line ---------------------------


def test_a_queued_completion_at_shutdown_gets_503():
    runner = Runner.start(str(ZIMAGE), timeout=120)
    running = open_request(runner, "/completion", LONG_IMAGE)
    time.sleep(1.0)
    queued = open_request(runner, "/completion", SMALL_IMAGE)
    time.sleep(0.5)
    runner.process.send_signal(signal.SIGTERM)
    assert status_of(queued) == 503
    assert runner.process.wait(10) == 0
    running.close()
    queued.close()
    runner.close()


# --- 2. /health answers while the model loads, with a progress figure that never goes back ---------


def test_health_answers_during_the_load_with_progress():
    import http.client

    from mlxrunner.launcher import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlxrunner", "--model", str(ZIMAGE), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                response = conn.getresponse()
                body = json.loads(response.read())
                conn.close()
            except ConnectionRefusedError:
                time.sleep(0.01)
                continue
            seen.append((response.status, body, time.monotonic() - start))
            if response.status == 200:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    loading = [(body["progress"], seconds) for status, body, seconds in seen if status == 503]
    assert seen[-1][0] == 200 and loading, seen
    progress = [p for p, _ in loading]
    assert progress == sorted(progress) and all(0 <= p < 1 for p in progress)
    assert max(seconds for _, seconds in loading) < 1.0, loading


# --- minor: reference images are PNG, JPEG or WebP; other formats are refused ------------------------


@pytest.mark.parametrize("image_format, accepted", [("PNG", True), ("JPEG", True), ("WEBP", True), ("GIF", False),
                                                    ("BMP", False), ("TIFF", False), ("ICO", False),
                                                    ("PPM", False)])
def test_reference_image_formats(image_format, accepted):
    import io

    from PIL import Image

    from mlxrunner.imagegen.images import BadImage, decode_image
    from mlxrunner.request import Limits

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format=image_format)
    if accepted:
        assert decode_image(buffer.getvalue(), "images[0]", Limits()).size == (64, 64)
    else:
        with pytest.raises(BadImage, match="PNG, JPEG or WebP"):
            decode_image(buffer.getvalue(), "images[0]", Limits())
