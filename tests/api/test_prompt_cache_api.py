"""The prompt cache seen from the wire: two real runner subprocesses on the tiny Qwen3 (with Qwen3's chat
template), one with the default cache and one started with `--prompt-cache-size 0`. A request that shares a
prefix with an earlier one reports the cached tokens and streams exactly what the cold runner streams."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

import openai
import pytest
from conftest import ENDLESS_TEXT, chat_model_folder

from mlxrunner.launcher import Runner

FIXTURES = Path(__file__).parents[1] / "fixtures"
QWEN3 = FIXTURES / "llm" / "qwen3-tiny"
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return chat_model_folder(tmp_path_factory.mktemp("qwen3-chat"))


@pytest.fixture(scope="module")
def warm(chat_model):
    with Runner.start(str(chat_model), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def cold(chat_model):
    with Runner.start(str(chat_model), timeout=120, extra_args=["--prompt-cache-size", "0"]) as runner:
        yield runner


def complete(runner: Runner, prompt: str, **options) -> tuple[str, dict]:
    lines = list(runner.complete({"prompt": prompt, "options": {**GREEDY, **options}}))
    return "".join(line.get("content", "") for line in lines[:-1]), lines[-1]


def client(runner: Runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{runner.host}:{runner.port}/v1", api_key="unused", max_retries=0)


def test_a_shared_prefix_is_counted_and_the_output_is_a_cold_runners(warm, cold):
    system = "You are a careful assistant. " * 40
    first_text, first = complete(warm, system + "Question one?", num_predict=16)
    assert first["prompt_cache_count"] == 0
    follow_up = system + "Question one?" + first_text + " Question two?"  # the first exchange, then more
    warm_text, warm_final = complete(warm, follow_up, num_predict=24)
    cold_text, cold_final = complete(cold, follow_up, num_predict=24)
    assert warm_final["prompt_cache_count"] > len(warm.tokenize(system))
    assert warm_final["prompt_cache_count"] < warm_final["prompt_eval_count"] == cold_final["prompt_eval_count"]
    assert cold_final["prompt_cache_count"] == 0  # --prompt-cache-size 0: no cache
    assert (warm_text, warm_final["eval_count"]) == (cold_text, cold_final["eval_count"])


def test_the_same_prompt_again_reuses_all_but_its_last_token(warm, cold):
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    complete(warm, prompt, num_predict=8, seed=5, temperature=0.9)
    text, final = complete(warm, prompt, num_predict=8, seed=5, temperature=0.9)
    assert final["prompt_cache_count"] == final["prompt_eval_count"] - 1
    cold_text, cold_final = complete(cold, prompt, num_predict=8, seed=5, temperature=0.9)
    assert (text, final["eval_count"]) == (cold_text, cold_final["eval_count"])


def test_chat_turns_report_cached_tokens_in_usage(warm, cold):
    turn = [{"role": "system", "content": "You answer in one line. " * 20}, {"role": "user", "content": "Hi"}]
    first = client(warm).chat.completions.create(model="m", messages=turn, max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And then?"}]
    second = client(warm).chat.completions.create(model="m", messages=turn2, max_tokens=12, temperature=0)
    cold_second = client(cold).chat.completions.create(model="m", messages=turn2, max_tokens=12, temperature=0)
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert cold_second.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens == cold_second.usage.prompt_tokens
    assert second.choices[0].message.content == cold_second.choices[0].message.content


def test_a_disconnect_mid_decode_leaves_the_cache_usable(warm, cold):
    conn = http.client.HTTPConnection(warm.host, warm.port, timeout=60)
    conn.request("POST", "/completion", body=json.dumps(ENDLESS_TEXT), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(5):
        response.readline()  # it is generating
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while not any("(completion) cancelled: client disconnected" in line for line in warm.stderr_tail):
        assert time.monotonic() < deadline, list(warm.stderr_tail)[-5:]
        time.sleep(0.05)
    prompt = ENDLESS_TEXT["prompt"]
    text, final = complete(warm, prompt, num_predict=40)
    assert final["prompt_cache_count"] == final["prompt_eval_count"] - 1
    cold_text, cold_final = complete(cold, prompt, num_predict=40)
    assert (text, final["eval_count"]) == (cold_text, cold_final["eval_count"])
