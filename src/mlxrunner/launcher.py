"""The parent's side: start a runner subprocess, wait until it is ready, talk to it, stop it.

What Ollama's Go parent does for its image runner (docs/formats.md), in Python:

    with Runner.start("all-minilm") as runner:
        vectors = runner.embed(["hello", "world"])
        for line in runner.complete({"prompt": "a cat"}): ...

Only the standard library is used, so a parent needs nothing but this file and Python.
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)


class RunnerError(RuntimeError):
    """The runner failed to start, died, or answered with an error."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def free_port(host: str = "127.0.0.1") -> int:
    # Racy by nature (as Ollama's is): the port may be taken between close and the child's bind.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Runner:
    """A running `python -m mlxrunner` subprocess serving one model on 127.0.0.1."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, model: str):
        self.process = process
        self.host = host
        self.port = port
        self.model = model
        self.last_stderr = ""
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
        self._readers = [
            threading.Thread(target=self._forward, args=(process.stdout, logging.INFO, False), daemon=True),
            threading.Thread(target=self._forward, args=(process.stderr, logging.WARNING, True), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    # --- lifecycle --------------------------------------------------------------------------------

    @classmethod
    def start(cls, model: str, *, port: int | None = None, timeout: float = 300.0, extra_args: list[str] = (),
              env: dict[str, str] | None = None, python: str = sys.executable) -> Runner:
        """Spawn the runner and wait for /health to say 200. Raises RunnerError with its last stderr line."""
        host = "127.0.0.1"
        port = port or free_port(host)
        cmd = [python, "-m", "mlxrunner", "--model", model, "--port", str(port), *extra_args]
        log.debug("starting runner: %s", " ".join(cmd))
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, **(env or {})}, text=True, encoding="utf-8",
                                   errors="replace", bufsize=1)
        runner = cls(process, host, port, model)
        try:
            runner.wait_until_ready(timeout)
        except BaseException:
            runner.close()
            raise
        return runner

    def wait_until_ready(self, timeout: float, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self._join_readers()
                raise RunnerError(f"mlx runner failed: {self.last_stderr or 'no output'} (exit: {code})")
            status, body = self._health()
            if status == 200:
                return
            if time.monotonic() > deadline:
                reason = self.last_stderr or "no output"
                raise RunnerError(f"timeout waiting for mlx runner: {reason}")
            time.sleep(poll)

    def health(self) -> dict:
        status, body = self._health()
        if status is None:
            raise RunnerError("mlx runner is not reachable")
        return body

    def close(self, grace: float = 5.0) -> int | None:
        """SIGINT, then SIGKILL after `grace` seconds (Ollama's Close). Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._join_readers()
        return self.process.returncode

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------------

    def complete(self, request: dict, timeout: float = 600.0) -> Iterator[dict]:
        """Yield each parsed NDJSON object of a /completion stream, up to the first done line."""
        conn, response = self._open("POST", "/completion", request, timeout)
        try:
            for raw in response:
                line = raw.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # as the Go parent: skip what is not JSON
                yield obj
                if obj.get("done"):
                    if obj.get("error"):
                        raise RunnerError(obj["error"])
                    return
            self._raise_closed()
        finally:
            conn.close()

    def embed(self, inputs: list[str] | str, normalize: bool | None = None, truncate: bool = True) -> list[list[float]]:
        body: dict[str, Any] = {"input": inputs, "truncate": truncate}
        if normalize is not None:
            body["normalize"] = normalize
        return self.post("/embedding", body)["embeddings"]

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text})["tokens"]

    def detokenize(self, tokens: list[int]) -> str:
        return self.post("/detokenize", {"tokens": tokens})["content"]

    def post(self, path: str, body: dict, timeout: float = 600.0) -> dict:
        conn, response = self._open("POST", path, body, timeout)
        try:
            return json.loads(response.read())
        finally:
            conn.close()

    # --- internals --------------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: dict | None, timeout: float):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            # Accept: typed errors, and a typed last line when shutdown cuts a stream (docs/protocol.md).
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json",
                                                              "Accept": "application/json"})
            response = conn.getresponse()
        except OSError as exc:
            conn.close()
            self._raise_closed(exc)
        if response.status != 200:
            text = response.read().decode("utf-8", "replace").strip()
            conn.close()
            try:
                text = json.loads(text).get("error", text)
            except (json.JSONDecodeError, AttributeError):
                pass
            raise RunnerError(text, status=response.status)
        return conn, response

    def _raise_closed(self, cause: Exception | None = None):
        message = "mlx runner closed response before completion"
        if self.process.poll() is not None and self.last_stderr:
            message += f": {self.last_stderr}"
        elif cause is not None:
            message += f": {cause}"
        raise RunnerError(message)

    def _health(self) -> tuple[int | None, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        except (OSError, json.JSONDecodeError):
            return None, {}
        finally:
            conn.close()

    def _forward(self, stream, level: int, is_stderr: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if is_stderr:
                self.last_stderr = line
                self.stderr_tail.append(line)
            log.log(level, "mlx-runner: %s", line)
        stream.close()

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(timeout=2.0)
