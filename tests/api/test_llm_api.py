"""LLM mode over HTTP: a real runner subprocess serving a tiny transformers-made Qwen3."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import ENDLESS_TEXT, ready_status

from mlxrunner.launcher import Runner, RunnerError

QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"


@pytest.fixture(scope="module")
def llm_runner():
    with Runner.start(str(QWEN3), timeout=120) as runner:
        yield runner


def stream_lines(runner: Runner, body: dict) -> tuple[int, str, list[bytes]]:
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=120)
    try:
        conn.request("POST", "/completion", body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                            "Accept": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().split(b"\n")
    finally:
        conn.close()


def test_health_says_llm(llm_runner):
    assert ready_status(llm_runner.health()) == {"status": "ok", "mode": "llm", "model": str(QWEN3)}


def test_stream_is_ndjson_with_no_blank_lines_and_a_final_line(llm_runner):
    status, ctype, raw = stream_lines(llm_runner, {"prompt": "Hello", "options": {"num_predict": 12,
                                                                                  "temperature": 0}})
    assert status == 200 and ctype == "application/x-ndjson"
    assert raw[-1] == b""  # the stream ends with a newline
    lines = [json.loads(line) for line in raw[:-1]]  # json.loads fails on a blank line
    chunks, final = lines[:-1], lines[-1]
    assert all(c["done"] is False and isinstance(c["content"], str) and c["content"] for c in chunks)
    assert final["done"] is True
    assert final["done_reason"] in ("stop", "length")
    if final["done_reason"] == "length":
        assert final["stop_reason"] == "num_predict" and final["eval_count"] == 12
    assert final["prompt_eval_count"] >= 1 and final["prompt_eval_duration"] > 0 and final["eval_duration"] > 0


def test_same_seed_same_text_and_greedy_is_deterministic(llm_runner):
    def text(**options):
        return "".join(o.get("content", "") for o in llm_runner.complete({"prompt": "Once upon a time",
                                                                         "options": options}))

    assert text(seed=7, num_predict=30, temperature=1.0) == text(seed=7, num_predict=30, temperature=1.0)
    assert text(temperature=0, num_predict=30) == text(temperature=0, num_predict=30)
    assert text(seed=7, num_predict=30, temperature=1.5) != text(seed=8, num_predict=30, temperature=1.5)


def test_stop_string_is_never_emitted_and_is_reported(llm_runner):
    full = "".join(o.get("content", "") for o in llm_runner.complete(
        {"prompt": "abc", "options": {"temperature": 0, "num_predict": 40}}))
    # A stop string that greedy decoding will produce: two characters from the middle of its text
    # (random weights also produce bytes that are not UTF-8; those show as U+FFFD and are skipped).
    candidates = [full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if "\ufffd" not in full[i:i + 2]]
    assert candidates, full
    stop = candidates[0]
    lines = list(llm_runner.complete({"prompt": "abc", "options": {"temperature": 0, "num_predict": 40,
                                                                   "stop": [stop]}}))
    text = "".join(o.get("content", "") for o in lines)
    assert stop not in text
    assert full.startswith(text)
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["stop_reason"] == f"stop:{stop}"


def test_prompt_longer_than_the_context_is_400(llm_runner):
    status, _, raw = stream_lines(llm_runner, {"prompt": "a " * 5000})
    assert status == 400 and "the model's context is 4096" in json.loads(b"".join(raw))["error"]


def test_bad_options_are_400_naming_the_field(llm_runner):
    status, _, raw = stream_lines(llm_runner, {"prompt": "x", "options": {"top_p": "high"}})
    assert status == 400 and 'field "options.top_p"' in json.loads(b"".join(raw))["error"]


def test_a_grammar_is_refused_not_ignored(llm_runner):
    status, _, raw = stream_lines(llm_runner, {"prompt": "x", "grammar": "root ::= \"{\" \"}\""})
    assert status == 400 and 'field "grammar"' in json.loads(b"".join(raw))["error"]
    status, _, _ = stream_lines(llm_runner, {"prompt": "x", "grammar": "", "options": {"num_predict": 1}})
    assert status == 200


def test_tokenize_detokenize_round_trip(llm_runner):
    tokens = llm_runner.tokenize("Hello world")
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert llm_runner.detokenize(tokens) == "Hello world"


def test_decoder_embeddings_are_unit_vectors(llm_runner):
    vectors = llm_runner.embed(["one", "two words"])
    assert len(vectors) == 2 and len(vectors[0]) == 64
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-4


def test_sigterm_mid_stream_ends_the_stream_with_an_error_line_and_exits_0():
    runner = Runner.start(str(QWEN3), timeout=120)
    lines, errors = [], []

    def client():
        try:
            for obj in runner.complete(ENDLESS_TEXT):
                lines.append(obj)
        except RunnerError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    runner.process.send_signal(signal.SIGTERM)
    code = runner.process.wait(10)
    thread.join(10)
    runner.close()
    assert code == 0 and time.monotonic() - start < 5
    assert lines, "no streamed line before SIGTERM"
    assert lines[-1]["done"] is True and lines[-1]["error"] == "the runner is shutting down"
    assert lines[-1]["content"] == "error: the runner is shutting down"
    assert errors == ["the runner is shutting down"]


def test_client_disconnect_mid_stream_cancels_generation(llm_runner):
    conn = http.client.HTTPConnection(llm_runner.host, llm_runner.port, timeout=60)
    conn.request("POST", "/completion", body=json.dumps(ENDLESS_TEXT),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # one line arrived: it is generating
    conn.sock.shutdown(socket.SHUT_RDWR)  # close() alone keeps the fd open while the response reads it
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any("(completion) cancelled: client disconnected" in line for line in llm_runner.stderr_tail):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(list(llm_runner.stderr_tail)[-5:])
    assert llm_runner.health()["status"] == "ok"


def test_a_llama_folder_is_served_too():
    llama = QWEN3.parent / "llama3-tiny"
    with Runner.start(str(llama), timeout=120) as runner:
        lines = list(runner.complete({"prompt": "Hello", "options": {"temperature": 0, "num_predict": 8}}))
        assert lines[-1]["done"] is True and lines[-1]["prompt_eval_count"] >= 2  # BOS + text
        tokens = runner.tokenize("Hello")
        assert tokens and 500 not in tokens  # /tokenize adds no BOS
        assert len(runner.embed(["Hello"])[0]) == 64
