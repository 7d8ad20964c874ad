"""What the reliability tests share: raw HTTP to a runner on 127.0.0.1, and waiting for its log lines."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

from mlxrunner.launcher import Runner

FIXTURES = Path(__file__).parents[1] / "fixtures"
QWEN3 = FIXTURES / "llm" / "qwen3-tiny"
ZIMAGE = FIXTURES / "zimage-tiny"
# An image job that takes many seconds on a CPU (200 steps at 256x256); cheap to cancel.
LONG_IMAGE = {"prompt": "a long job", "width": 1024, "height": 1024, "steps": 200, "seed": 1}  # ~25 s here
SMALL_IMAGE = {"prompt": "still serving", "width": 32, "height": 32, "steps": 1, "guidance": 0, "seed": 1}


def post(runner: Runner, path: str, body: bytes | dict, timeout: float = 60) -> tuple[int, str, bytes]:
    """(status, content type, raw body) of one POST."""
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=timeout)
    try:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json", "Accept": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def post_json(runner: Runner, path: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    status, _, raw = post(runner, path, body, timeout)
    return status, json.loads(raw.split(b"\n")[0])


def health_seconds(runner: Runner, timeout: float = 10) -> float:
    """How long one GET /health takes to answer."""
    start = time.monotonic()
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
    finally:
        conn.close()
    return time.monotonic() - start


def open_request(runner: Runner, path: str, body: dict) -> socket.socket:
    """Send a POST and return its socket without reading the answer (closing it = the client leaves)."""
    raw = json.dumps(body).encode()
    sock = socket.create_connection((runner.host, runner.port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 "Accept: application/json\r\n"
                 f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def status_of(sock: socket.socket) -> int:
    """The status code of the answer on `sock` (blocks until its status line arrives)."""
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed before a status line")
        line += chunk
    return int(line.split()[1])


def wait_for_log(runner: Runner, text: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(text in line for line in list(runner.stderr_tail)) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged: {list(runner.stderr_tail)[-5:]}"
        time.sleep(0.05)
