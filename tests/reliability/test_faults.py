"""Faults against real runner subprocesses: 50 concurrent clients, a client leaving at each phase of a
job (queued, denoising, VAE decode, streaming), slow and idle connections."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ENDLESS_TEXT
from reliability_helpers import (
    LONG_IMAGE,
    QWEN3,
    SMALL_IMAGE,
    ZIMAGE,
    open_request,
    post_json,
    status_of,
    wait_for_log,
)

from mlxrunner.launcher import Runner

CANCELLED = "(completion) cancelled: client disconnected"


@pytest.fixture(scope="module")
def image_runner():
    with Runner.start(str(ZIMAGE), timeout=120) as runner:
        yield runner


def read_lines_until(sock: socket.socket, done, timeout: float = 120) -> list[dict]:
    """Read the NDJSON stream on `sock` (after its headers) until done(line) holds; return the lines."""
    sock.settimeout(timeout)
    buffer, lines = b"", []
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    buffer = buffer.split(b"\r\n\r\n", 1)[1]
    while True:
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            if raw.strip() and not raw.strip().isalnum():  # skip the chunked encoding's size lines
                line = json.loads(raw)
                lines.append(line)
                if done(line):
                    return lines
        chunk = sock.recv(65536)
        assert chunk, "the stream ended early"
        buffer += chunk


# --- 50 concurrent clients: every answer correct or a clean 503 -------------------------------------


def test_fifty_concurrent_clients_get_a_correct_answer_or_a_clean_503():
    with Runner.start("all-minilm", extra_args=["--queue-depth", "8"], timeout=120) as runner:
        texts = [f"client {i} asks about the weather" for i in range(50)]
        expected = {t: np.array(runner.embed([t])[0]) for t in texts}

        def one(text: str) -> tuple[str, int, dict]:
            status, body = post_json(runner, "/embedding", {"input": [text] * 64}, timeout=120)
            return text, status, body

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, texts))
        served = 0
        for text, status, body in answers:
            if status == 503:
                assert "queue is full" in body["error"], body
                continue
            assert status == 200, body
            vectors = np.array(body["embeddings"])
            assert vectors.shape == (64, 384) and np.allclose(vectors, expected[text], atol=1e-5)
            served += 1
        assert served >= 9  # the running job and the 8 queued ones at least
        assert runner.health()["status"] == "ok"


# --- a client leaving at each phase ---------------------------------------------------------------


def test_leaving_while_denoising_cancels_the_job_at_its_next_step(image_runner):
    sock = open_request(image_runner, "/completion", LONG_IMAGE)
    read_lines_until(sock, lambda line: line.get("step") == 1)
    before = sum(CANCELLED in line for line in image_runner.stderr_tail)
    sock.close()
    wait_for_log(image_runner, CANCELLED, count=before + 1, timeout=30)
    status, body = post_json(image_runner, "/completion", SMALL_IMAGE, timeout=60)
    assert status == 200


def test_leaving_during_the_vae_decode_cancels_it(image_runner):
    # 512² decodes in ~8 s on two CPU cores (its one step takes ~1 s): without checks between the
    # decoder's blocks the job would finish instead of logging its cancellation.
    big = {"prompt": "a large decode", "width": 512, "height": 512, "steps": 1, "guidance": 0, "seed": 3}
    sock = open_request(image_runner, "/completion", big)
    read_lines_until(sock, lambda line: line.get("step") == line.get("total") == 1)  # denoised: decoding now
    before = sum(CANCELLED in line for line in image_runner.stderr_tail)
    sock.close()
    wait_for_log(image_runner, CANCELLED, count=before + 1, timeout=30)
    status, _ = post_json(image_runner, "/completion", SMALL_IMAGE, timeout=60)
    assert status == 200


def test_leaving_while_queued_and_while_streaming_text():
    # One request at a time: a second request waits in the queue (with batching it would join the first).
    with Runner.start(str(QWEN3), timeout=120, extra_args=["--max-batch", "1"]) as runner:
        streaming = open_request(runner, "/completion", ENDLESS_TEXT)
        read_lines_until(streaming, lambda line: "content" in line)
        queued = open_request(runner, "/completion", {"prompt": "wait", "options": {"num_predict": 2}})
        time.sleep(0.3)
        queued.close()
        wait_for_log(runner, CANCELLED, count=1, timeout=30)  # the queued one, at once
        streaming.close()
        wait_for_log(runner, CANCELLED, count=2, timeout=30)
        status, body = post_json(runner, "/completion", {"prompt": "again", "options": {"num_predict": 2}})
        assert status == 200 and "content" in body


# --- slow and idle connections: the timeouts ---------------------------------------------------------


@pytest.fixture(scope="module")
def impatient_runner():
    with Runner.start("all-minilm", extra_args=["--read-timeout", "1", "--keepalive-timeout", "2"],
                      timeout=120) as runner:
        yield runner


def test_a_body_that_never_finishes_gets_408(impatient_runner):
    sock = socket.create_connection((impatient_runner.host, impatient_runner.port), timeout=10)
    sock.sendall(b"POST /embedding HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"input\": ")
    assert status_of(sock) == 408
    sock.close()


@pytest.mark.parametrize("sent", [b"", b"POST /embedding HTTP/1.1\r\nHost: x\r\n"])
def test_idle_connections_and_headers_that_never_end_are_closed(impatient_runner, sent):
    sock = socket.create_connection((impatient_runner.host, impatient_runner.port), timeout=10)
    start = time.monotonic()
    sock.sendall(sent)
    assert sock.recv(1024) == b""  # closed by the runner, not by our 10 s timeout
    assert time.monotonic() - start < 6
    sock.close()


def test_malformed_http_is_aiohttps_plain_400(impatient_runner):
    sock = socket.create_connection((impatient_runner.host, impatient_runner.port), timeout=10)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    assert status_of(sock) == 400
    sock.close()
