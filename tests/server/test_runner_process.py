"""The runner process: flags, exit codes, the last stderr line, logging levels, signals."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ready_status, run_cli

from mlxrunner import logs


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: --model/-model, --port/-port"),
    (["--model", "all-minilm"], "the following arguments are required: --port/-port"),
    (["--model", "all-minilm", "--port", "http"], "invalid int value"),
    (["--model", "all-minilm", "--port", "70000"], "is not a TCP port"),
    (["--model", "all-minilm", "--port", "0", "--bogus"], "unrecognized arguments: --bogus"),
    (["--model", "all-minilm", "--port", "0", "--log-level", "loud"], "unknown log level 'loud'"),
    (["--model", "all-minilm", "--port", "0", "--queue-depth", "-1"], "argument --queue-depth: must be >= 0"),
    (["--model", "all-minilm", "--port", "0", "--denoise-queue-depth", "x"],
     "argument --denoise-queue-depth: invalid int value: 'x'"),
])
def test_bad_flags_print_usage_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "usage: mlxrunner" in result.stderr and message in result.stderr


@pytest.mark.parametrize("model, message", [
    ("/no/such/dir-or-model", "not found"),
    ("../../etc/passwd", ".."),
])
def test_unloadable_model_exits_1_with_error_as_last_stderr_line(model, message):
    result = run_cli("--model", model, "--port", "0")
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert line.startswith("Error: ") and message in line


def test_bad_model_directory_names_what_was_found(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    result = run_cli("--model", str(tmp_path), "--port", "0")
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert "unsupported image model" in line and "StableDiffusionPipeline" in line and "ZImagePipeline" in line


def test_memory_check_uses_ollamas_wording():
    result = run_cli("--model", "all-minilm", "--port", "0", env={"MLXRUNNER_MEMORY_LIMIT": "1MB"})
    assert result.returncode == 1
    assert last_line(result.stderr).startswith("Error: insufficient memory for this embedding model: need 86 MB, "
                                               "have 1 MB")


def test_a_bad_environment_variable_exits_1_naming_it():
    result = run_cli("--model", "all-minilm", "--port", "0", env={"MLXRUNNER_MEMORY_LIMIT": "lots"})
    assert result.returncode == 1
    assert last_line(result.stderr) == \
        "Error: MLXRUNNER_MEMORY_LIMIT: not a byte size: 'lots' (e.g. 16GB, 512MiB, 1000)"


def _start(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "mlxrunner", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _wait_ready(url, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except OSError:
            time.sleep(0.05)
    raise AssertionError("runner did not become ready")


@pytest.mark.parametrize("argv", [
    ["--model", "all-minilm", "--port", "0", "--skip-memory-check"],
    # Ollama's launch form, with Go-style single-dash and --x=v flags.
    ["runner", "--imagegen-engine", "-model", "all-minilm", "--port=0"],
])
def test_port_0_prints_the_address_serves_and_sigterm_exits_0(argv):
    proc = _start(*argv, env={"MLXRUNNER_MEMORY_LIMIT": "1MB"} if "--skip-memory-check" in argv else None)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        health = _wait_ready(url)
        assert ready_status(health) == {"status": "ok", "mode": "embedding", "model": "all-minilm"}
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - start < 5
    finally:
        proc.kill()
        proc.wait()
    assert "shutting down mlx runner" in proc.stderr.read()


def test_port_in_use_is_exit_1():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_cli("--model", "all-minilm", "--port", str(port))
    assert result.returncode == 1
    assert last_line(result.stderr).startswith(f"Error: listen tcp 127.0.0.1:{port}")


@pytest.mark.parametrize("value, level", [
    ("", 20), ("0", 20), ("false", 20), ("1", 10), ("true", 10), ("2", 1), ("-1", 30), ("junk", 20),
])
def test_ollama_debug_levels(value, level):
    assert logs.level_from_ollama_debug(value) == level


def test_ollama_debug_turns_on_debug_lines_and_lines_stay_single():
    result = run_cli("--model", "/nonexistent", "--port", "0", env={"OLLAMA_DEBUG": "1"})
    assert "level=DEBUG" in result.stderr
    assert all(len(line) < 64 * 1024 for line in result.stderr.splitlines())
    quiet = run_cli("--model", "/nonexistent", "--port", "0", env={"OLLAMA_DEBUG": "0"})
    assert "level=DEBUG" not in quiet.stderr


def test_log_lines_are_escaped_and_bounded():
    import logging

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a\nb" + "z" * 100_000, None, None)
    line = logs.OneLineFormatter().format(record)
    assert "\n" not in line and len(line) < 64 * 1024 and "a\\nb" in line


def test_embed_command_prints_similarities():
    result = run_cli("embed", "--model", "all-minilm", "A man is eating food.", "A man is eating pasta.",
                     "The girl is carrying a baby.")
    assert result.returncode == 0, result.stderr
    assert "3 embeddings of 384 dimensions" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("[") and "'" not in line]
    sims = [[float(x) for x in row.split()[1:]] for row in rows]
    assert sims[0][0] == pytest.approx(1.0, abs=1e-3)
    assert sims[0][1] > 0.6 > sims[0][2]  # food ~ pasta, not ~ baby
    assert "loading" in result.stderr and "embedding" in result.stderr  # the progress bars


def test_embed_command_json_output():
    result = run_cli("embed", "--model", "all-minilm", "--json", "hello")
    vectors = json.loads(result.stdout)["embeddings"]
    assert len(vectors) == 1 and len(vectors[0]) == 384
