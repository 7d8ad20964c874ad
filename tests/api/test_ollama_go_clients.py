"""Ollama's own Go client code against real runners: the --mlx-engine Client, the image parent, llmServer.

tests/go/ollamaclients copies the reading side of those parents from Ollama's source (their structs,
decoders and loops, Go's encoding/json); it is built with the `go` command, so these tests are skipped
where Go is not installed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mlxrunner.launcher import Runner

FIXTURES = Path(__file__).parents[1] / "fixtures"
QWEN3 = FIXTURES / "llm" / "qwen3-tiny"
ZIMAGE = FIXTURES / "zimage-tiny"
GO_CLIENTS = Path(__file__).parents[1] / "go" / "ollamaclients"

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed")


@pytest.fixture(scope="module")
def go_clients(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("go") / "ollamaclients"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=GO_CLIENTS, check=True, timeout=300)
    return binary


def run_go(binary: Path, check: str, runner: Runner, *args: str) -> dict:
    done = subprocess.run([str(binary), check, str(runner.port), *args], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def engine():
    with Runner.start(str(QWEN3), timeout=120, extra_args=["--mlx-engine"]) as runner:
        yield runner


def test_the_mlx_engine_client_is_ready_and_reads_the_context_length(go_clients, engine):
    got = run_go(go_clients, "mlx-status", engine)
    assert got["error"] is None
    assert got["status"]["Status"] == 0 and got["status"]["ContextLength"] == 4096 and got["status"]["Memory"] > 0


def test_the_mlx_engine_client_streams_a_completion(go_clients, engine):
    request = {"Prompt": "Once upon", "Options": {"num_predict": 8, "temperature": 0.8, "top_k": 40, "top_p": 0.9,
                                                  "repeat_last_n": 64, "repeat_penalty": 1.1, "seed": 3}}
    got = run_go(go_clients, "mlx-completion", engine, json.dumps(request))
    assert got["error"] is None
    lines = got["lines"]
    assert all(not line["Done"] and line["Content"] for line in lines[:-1])
    final = lines[-1]
    assert final["Done"] and final["PromptEvalCount"] >= 1 and final["EvalDuration"] > 0
    assert final["DoneReason"] == 0 or final["EvalCount"] == 8


@pytest.mark.parametrize("prompt, message", [
    ("", "empty prompt"),
    ("a" + " a" * 4199, "input length (4200 tokens) exceeds the model's maximum context length (4096 tokens)"),
])
def test_the_mlx_engine_client_shows_our_validation_errors_as_they_are(go_clients, engine, prompt, message):
    got = run_go(go_clients, "mlx-completion", engine, json.dumps({"Prompt": prompt}))
    assert got["error"] == message


def test_the_mlx_engine_client_tokenizes(go_clients, engine):
    got = run_go(go_clients, "mlx-tokenize", engine, "Hello world")
    assert got["error"] is None and got["tokens"] == engine_tokens(engine, "Hello world")


def engine_tokens(runner: Runner, text: str) -> list[int]:
    import http.client

    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=30)
    try:
        conn.request("POST", "/v1/tokenize", body=text.encode(), headers={"Content-Type": "text/plain"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_the_image_parent_gets_an_image_and_plain_errors(go_clients):
    with Runner.start(str(ZIMAGE), timeout=120) as runner:
        assert run_go(go_clients, "image-ping", runner)["error"] is None
        good = {"prompt": "a fox", "width": 32, "height": 32, "steps": 1, "seed": 1}
        got = run_go(go_clients, "image-completion", runner, json.dumps(good))
        bad = run_go(go_clients, "image-completion", runner, json.dumps({**good, "steps": 1000}))
    assert got["error"] is None and got["lines"][-1]["done"] and got["lines"][-1]["image"]
    assert bad["error"] == 'field "steps" must be between 0 and 200, got 1000'  # the text itself, not JSON in it


def test_llmserver_reads_health_as_its_integer_status(go_clients):
    with Runner.start(str(QWEN3), timeout=120) as runner:
        got = run_go(go_clients, "llmserver-status", runner)
    assert got == {"status": 0, "progress": 1, "error": None}


def test_the_image_parent_reports_a_job_cut_by_shutdown_as_an_error(go_clients):
    # Longer than the SIGTERM below plus the shutdown's 3 s grace by far: ~25 s here (512x512 took 6.7 s once the CPU
    # kernels had sped up, and finished within the grace).
    long_job = {"prompt": "a long job", "width": 1024, "height": 1024, "steps": 200, "seed": 1}
    runner = Runner.start(str(ZIMAGE), timeout=120)
    try:
        client = subprocess.Popen([str(go_clients), "image-completion", str(runner.port), json.dumps(long_job)],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(4.0)  # denoising: the tiny model encodes its prompt in well under a second
        runner.process.send_signal(signal.SIGTERM)
        code = runner.process.wait(10)
        got = json.loads(client.communicate(timeout=30)[0])
    finally:
        runner.close()
    assert code == 0
    assert got["error"] == "mlx runner closed response before completion"  # not an empty "success"
    assert got["lines"] and not any(line["done"] for line in got["lines"])
