"""Concurrent LLM requests against a real server, shared by benchmarks/cpu/test_batch.py and
benchmarks/gpu/batch_bench.py: N clients send a completion each at once, and the aggregate throughput is the
tokens all of them got over the wall time from the first request sent to the last answer read.

- ours: the runner subprocess (`python -m mlxrunner --model FOLDER --max-batch N`), its `/v1/completions`.
- mlx-lm: its server (`python -m mlx_lm server --model FOLDER --decode-concurrency N`), its `/v1/completions`,
  which batches concurrent requests with its BatchGenerator.

Both get the same prompts and the same request: `max_tokens` tokens at temperature 0. Standard library only on
the client side, so the peer's server may run under another Python (`--peer-python`).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SIDES = ["ours", "mlx-lm"]
WORDS = ["river", "stone", "light", "garden", "winter", "copper", "signal", "harbor", "meadow", "engine"]


def prompts(n: int, words: int = 24) -> list[str]:
    """n different prompts of about the same length."""
    return [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(words)) + f" {i}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotReady(RuntimeError):
    """The server answered 503: still loading."""


@dataclass
class Server:
    """A server subprocess answering OpenAI completions on loopback."""

    side: str
    process: subprocess.Popen
    port: int
    log: Path  # the server's stderr: a file, so nothing blocks on a full pipe and a crash leaves its reason

    @classmethod
    def start(cls, side: str, folder: Path, max_streams: int, python: str = sys.executable,
              timeout: float = 600.0, max_batch: int | None = None) -> Server:
        """max_batch: ours decodes this many together (default: max_streams; 1: one at a time)."""
        port = free_port()
        if side == "ours":
            cmd = [python, "-m", "mlxrunner", "--model", str(folder), "--port", str(port),
                   "--max-batch", str(max_batch or max_streams), "--queue-depth", str(max_streams), "--no-ui"]
        else:
            cmd = [python, "-m", "mlx_lm", "server", "--model", str(folder), "--host", "127.0.0.1", "--port",
                   str(port), "--decode-concurrency", str(max_streams), "--log-level", "WARNING"]
        log = Path(tempfile.mkstemp(prefix=f"batch-serving-{side}-", suffix=".log")[1])
        with log.open("w") as stderr:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        server = cls(side, process, port, log)
        server._wait_until_ready(timeout)
        return server

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.side} server exited: {self.log_tail()}")
            try:
                self.complete("ready?", 1)  # mlx-lm loads its model on the first request
                return
            except (OSError, NotReady):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.side} server not ready after {timeout:.0f} s")

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        """One greedy completion: its text and how many tokens it generated. A connection reset before any answer
        is retried: mlx-lm's server (Python's http.server) listens with a queue of 5 connections, so many streams
        opened at once are refused until it accepts; the wait counts in the round's time, as a client's would."""
        for _ in range(49):
            try:
                return self._complete_once(prompt, max_tokens)
            except ConnectionResetError:
                time.sleep(0.05)
        return self._complete_once(prompt, max_tokens)  # the 50th attempt: its error is the caller's

    def _complete_once(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            body = {"model": "default_model" if self.side == "mlx-lm" else "m", "prompt": prompt,
                    "max_tokens": max_tokens, "temperature": 0.0}
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            if response.status == 503:
                raise NotReady(f"{self.side}: {answer}")
            if response.status != 200:
                raise RuntimeError(f"{self.side}: HTTP {response.status}: {answer}")
            return answer["choices"][0]["text"], answer["usage"]["completion_tokens"]
        finally:
            conn.close()

    def streams(self, texts: list[str], max_tokens: int) -> Round:
        """All `texts` at once, a client each."""
        with ThreadPoolExecutor(len(texts)) as pool:
            started = time.perf_counter()
            answers = list(pool.map(lambda t: self.complete(t, max_tokens), texts))
            seconds = time.perf_counter() - started
        return Round(len(texts), sum(n for _, n in answers), seconds, [text for text, _ in answers])

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Round:
    streams: int
    tokens: int  # generated, all streams together
    seconds: float
    texts: list[str]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds
