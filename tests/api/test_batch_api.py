"""Concurrent LLM requests decoded in one batch, seen from the wire: two real runner subprocesses on the tiny
Qwen3, one batching (`--max-batch 8`) and one running requests one at a time (`--max-batch 1`). Every request
sent at once to the batching runner streams exactly what it streams alone on the other, and transformers' greedy
goldens where the request is one of theirs."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ENDLESS_TEXT

from mlxrunner.launcher import Runner

ROOT = Path(__file__).parents[1]
QWEN3 = ROOT / "fixtures" / "llm" / "qwen3-tiny"
GOLDENS = json.loads((ROOT / "goldens" / "llm_qwen3-tiny.json").read_text())
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def batching():
    with Runner.start(str(QWEN3), timeout=120, extra_args=["--max-batch", "8"]) as runner:
        yield runner


@pytest.fixture(scope="module")
def serial():
    with Runner.start(str(QWEN3), timeout=120, extra_args=["--max-batch", "1", "--prompt-cache-size", "0"]) as runner:
        yield runner


def complete(runner: Runner, request: dict) -> tuple[str, dict]:
    lines = list(runner.complete(request))
    return "".join(line.get("content", "") for line in lines[:-1]), lines[-1]


def golden_requests() -> list[tuple[dict, str]]:
    prompts = {p["id"]: p["text"] for p in GOLDENS["prompts"]}
    return [({"prompt": prompts[e["prompt_id"]], "options": {**GREEDY, "num_predict": len(e["new_ids"])}}, e["text"])
            for e in GOLDENS["greedy"]]


def what_counts(final: dict) -> tuple:
    """The final line's fields that must not depend on batching (the prompt cache's count may)."""
    return final["done_reason"], final.get("stop_reason"), final["prompt_eval_count"], final["eval_count"]


class Disconnecting:
    """An endless greedy request that reads a few lines, then hangs up once released."""

    def __init__(self, runner: Runner):
        self.started = threading.Event()
        self.release = threading.Event()
        self.runner = runner

    def __call__(self) -> None:
        conn = http.client.HTTPConnection(self.runner.host, self.runner.port, timeout=60)
        conn.request("POST", "/completion", body=json.dumps(ENDLESS_TEXT),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        for _ in range(5):
            response.readline()
        self.started.set()
        assert self.release.wait(60)
        response.readline()  # still streaming
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def wait_for_log(runner: Runner, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while sum(text in line for line in runner.stderr_tail) < count:
        assert time.monotonic() < deadline, list(runner.stderr_tail)[-5:]
        time.sleep(0.05)


def test_concurrent_requests_each_stream_what_they_stream_alone(batching, serial):
    """transformers' five greedy continuations, plus a stop string, a seeded sample (twice), a longer budget and a
    request that joins while an endless one streams and is then cancelled by its client."""
    goldens = golden_requests()
    story = {"prompt": "Once upon a time", "options": {**GREEDY, "num_predict": 60}}
    stop = complete(serial, story)[0][20:23]  # a stop string its text reaches a third of the way in
    others = [
        {**story, "options": {**story["options"], "stop": [stop]}},
        {"prompt": "Seeded", "options": {"temperature": 0.9, "top_k": 30, "seed": 42, "num_predict": 30}},
        {"prompt": "Seeded", "options": {"temperature": 0.9, "top_k": 30, "seed": 42, "num_predict": 30}},
        {"prompt": "A penalised answer", "options": {"temperature": 0, "repeat_penalty": 1.5, "num_predict": 50}},
        {"prompt": "hello world " * 40, "options": {**GREEDY, "num_predict": 120}},
    ]
    requests = [r for r, _ in goldens] + others
    alone = [complete(serial, r) for r in requests]
    cancelled = Disconnecting(batching)
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        endless = pool.submit(cancelled)
        assert cancelled.started.wait(60)  # the others join while it decodes
        together = list(pool.map(lambda r: complete(batching, r), requests))
        cancelled.release.set()
        endless.result()
    wait_for_log(batching, "(completion) cancelled: client disconnected")
    for (text, final), (alone_text, alone_final), request in zip(together, alone, requests):
        assert text == alone_text, request
        assert what_counts(final) == what_counts(alone_final), request
    for (text, _), (_, golden_text) in zip(together, goldens):
        assert text == golden_text
    assert together[5][1]["stop_reason"].startswith("stop:")
    assert together[6][0] == together[7][0]  # the same seed, side by side
    # The cancelled request left its caches behind: sent again it resumes from them.
    shorter = {**ENDLESS_TEXT, "options": {**ENDLESS_TEXT["options"], "num_predict": 30}}
    text, final = complete(batching, shorter)
    assert final["prompt_cache_count"] == final["prompt_eval_count"] - 1
    alone_text, alone_final = complete(serial, shorter)
    assert (text, final["eval_count"]) == (alone_text, alone_final["eval_count"])


def test_the_queue_holds_what_the_batch_cannot_take():
    """--max-batch 2 --queue-depth 1: two requests decode, one waits, the next is refused with a 503; the waiting
    one runs once a running one is cancelled."""
    args = ["--max-batch", "2", "--queue-depth", "1", "--log-level", "debug"]
    with Runner.start(str(QWEN3), timeout=120, extra_args=args) as runner:
        running = [Disconnecting(runner) for _ in range(2)]
        with ThreadPoolExecutor(4) as pool:
            futures = []
            for request in running:  # one after the other: two at once could find the one queue slot taken
                futures.append(pool.submit(request))
                assert request.started.wait(60)
            waiting = pool.submit(complete, runner, {"prompt": "queued", "options": {**GREEDY, "num_predict": 8}})
            wait_for_log(runner, "job 4 (completion) queued")  # job 1 loaded the model, 2 and 3 run
            conn = http.client.HTTPConnection(runner.host, runner.port, timeout=60)
            conn.request("POST", "/completion", body=json.dumps({"prompt": "x", "options": {"num_predict": 1}}),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 503
            assert "queue is full" in response.read().decode()
            conn.close()
            assert not waiting.done()
            running[0].release.set()
            text, final = waiting.result(timeout=60)  # it takes the cancelled one's place
            assert final["done_reason"] == "length" and final["eval_count"] == 8
            running[1].release.set()
            for future in futures:
                future.result()
