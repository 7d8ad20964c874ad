"""What Ollama's Go parents need from our own routes, over real HTTP to runner subprocesses.

The requests are sent as Ollama's Go code sends them (`http.Client`: no Accept header; llmServer's
GET /health carries `Content-Type: application/json`), and the answers are checked as that code
reads them: errors are the body text of a non-200 status, a stream is good only if it ends with a
done line that has a result.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from mlxrunner.launcher import Runner

FIXTURES = Path(__file__).parents[1] / "fixtures"
QWEN3 = FIXTURES / "llm" / "qwen3-tiny"
ZIMAGE = FIXTURES / "zimage-tiny"
LONG_IMAGE = {"prompt": "a long job", "width": 1024, "height": 1024, "steps": 200, "seed": 1}  # ~25 s here


@pytest.fixture(scope="module")
def llm_runner():
    with Runner.start(str(QWEN3), timeout=120) as runner:
        yield runner


def go_request(runner: Runner, method: str, path: str, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request as Go's http.Client sends it: no Accept header."""
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or ({"Content-Type": "application/json"} if body else {}))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def open_stream(runner: Runner, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=60)
    conn.request("POST", "/completion", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_lines(response: http.client.HTTPResponse, into: list[dict]) -> None:
    for raw in response:
        if raw.strip():
            into.append(json.loads(raw))


# --- errors: plain text, as Go's http.Error ----------------------------------------------------------


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/completion", b"{not json", 400,
     "request body is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ("POST", "/completion", b'{"prompt": "hi", "options": {"top_p": 2}}', 400,
     'field "options.top_p" must be between 0 and 1, got 2'),
    ("POST", "/tokenize", b"{}", 400, 'field "content" is required'),
    ("POST", "/detokenize", b'{"tokens": [999999]}', 400, 'field "tokens": token id 999999 is outside the vocabulary'),
    ("GET", "/completion", None, 405, "method GET not allowed on /completion; use POST"),
    ("POST", "/nowhere", b"{}", 404, "Not Found: POST /nowhere"),
])
def test_errors_on_ollamas_routes_are_plain_text(llm_runner, method, path, body, status, message):
    got_status, headers, raw = go_request(llm_runner, method, path, body)
    assert got_status == status and headers["content-type"] == "text/plain; charset=utf-8"
    assert raw.decode().endswith("\n") and raw.decode().strip().startswith(message)


def test_a_client_that_asks_for_json_gets_the_typed_error(llm_runner):
    status, headers, raw = go_request(llm_runner, "POST", "/tokenize", b"{}",
                                      {"Content-Type": "application/json", "Accept": "application/json"})
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(raw) == {"error": 'field "content" is required'}


def test_openai_routes_keep_openais_json_errors(llm_runner):
    status, headers, raw = go_request(llm_runner, "POST", "/v1/embeddings", b"{}")
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(raw)["error"]["param"] == "input"


# --- /health for both parents, /embedding's count ------------------------------------------------------


def test_health_answers_llmservers_integer_status_and_our_form_otherwise(llm_runner):
    status, _, raw = go_request(llm_runner, "GET", "/health", headers={"Content-Type": "application/json"})
    assert status == 200 and json.loads(raw) == {"status": 0, "progress": 1.0}  # ServerStatusReady
    status, _, raw = go_request(llm_runner, "GET", "/health")  # the image parent: the status code only
    assert status == 200 and json.loads(raw)["status"] == "ok"


def test_embedding_in_ollamas_form_counts_the_prompt(llm_runner):
    status, _, raw = go_request(llm_runner, "POST", "/embedding", b'{"content": "Hello world"}')
    body = json.loads(raw)
    assert status == 200 and len(body["embedding"]) == 64
    assert body["prompt_eval_count"] == len(llm_runner.tokenize("Hello world"))  # Qwen3 adds no BOS


# --- cancel and shutdown on an image job ------------------------------------------------------------------


def test_an_image_client_cancel_logs_one_info_line_and_nothing_else():
    with Runner.start(str(ZIMAGE), timeout=120) as runner:
        conn, response = open_stream(runner, LONG_IMAGE)
        assert response.status == 200
        response.readline()  # a progress line: it is generating
        before = len(runner.stderr_tail)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 30
        while not any("cancelled: client disconnected" in line for line in runner.stderr_tail):
            assert time.monotonic() < deadline, list(runner.stderr_tail)[-5:]
            time.sleep(0.05)
        time.sleep(1.0)  # asyncio logs an unretrieved task exception only once the task is collected
        after = list(runner.stderr_tail)[before:]
        assert runner.health()["status"] == "ok"
    cancel_lines = [line for line in after if "cancelled" in line]
    assert len(cancel_lines) == 1 and "level=INFO" in cancel_lines[0], after
    assert not [line for line in after if "level=ERROR" in line or "Task exception" in line or "Traceback" in line]


def test_sigterm_ends_a_job_that_cannot_finish_in_the_grace_without_a_done_line_and_refuses_the_queued():
    runner = Runner.start(str(ZIMAGE), timeout=120)
    lines: list[dict] = []
    try:
        conn, response = open_stream(runner, LONG_IMAGE)
        reader = threading.Thread(target=read_lines, args=(response, lines))
        reader.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        queued: dict = {}

        def second_request():
            status, headers, raw = go_request(runner, "POST", "/completion", json.dumps(LONG_IMAGE).encode())
            queued.update(status=status, type=headers.get("content-type"), body=raw.decode())

        waiting = threading.Thread(target=second_request)
        waiting.start()
        time.sleep(0.5)  # queued behind the running job
        start = time.monotonic()
        runner.process.send_signal(signal.SIGTERM)
        code = runner.process.wait(10)
        elapsed = time.monotonic() - start
        reader.join(10)
        waiting.join(10)
        conn.close()
    finally:
        runner.close()
    assert code == 0 and elapsed < 5
    assert lines and all(line["done"] is False for line in lines)  # no done line: Ollama's parent sees an error
    assert queued == {"status": 503, "type": "text/plain; charset=utf-8", "body": "the runner is shutting down\n"}


def test_sigterm_lets_a_running_llm_job_finish_within_the_grace():
    with Runner.start(str(QWEN3), timeout=120) as runner:
        started = time.monotonic()
        calibration: list[dict] = []
        read_lines(open_stream(runner, {"prompt": "go", "options": {"num_predict": 64, "temperature": 0}})[1],
                   calibration)
        per_token = (time.monotonic() - started) / 64
        tokens = max(8, min(4000, int(1.0 / per_token)))  # about one second of generation: well inside the grace
        lines: list[dict] = []
        conn, response = open_stream(runner, {"prompt": "go", "options": {"num_predict": tokens, "temperature": 0,
                                                                           "stop": []}})
        reader = threading.Thread(target=read_lines, args=(response, lines))
        reader.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.005)
        runner.process.send_signal(signal.SIGTERM)
        code = runner.process.wait(10)
        reader.join(10)
        conn.close()
    assert code == 0
    assert lines[-1]["done"] is True and "error" not in lines[-1], lines[-1]
