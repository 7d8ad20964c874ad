"""The soak (`pytest -m soak tests/reliability/test_soak.py -s`, minutes; not in CI): 2,000+ fuzzed
requests per mode against a real runner, counting crashes, 5xx answers and hangs. Its last figures
are in docs/testing.md."""

from __future__ import annotations

import collections
import http.client
import json

import pytest
from conftest import chat_model_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import QWEN3, ZIMAGE
from test_parser_fuzz import bodies, json_values, response_items

from mlxrunner.launcher import Runner

pytestmark = pytest.mark.soak

REQUESTS_PER_MODE = 2000
HANG_SECONDS = 60
MODES = {"embedding": ("all-minilm", ["/embedding", "/v1/embeddings", "/tokenize", "/detokenize"]),
         "llm": (str(QWEN3), ["/completion", "/embedding", "/v1/embeddings", "/tokenize", "/detokenize"]),
         "image": (str(ZIMAGE), ["/completion"]),
         # The tiny Qwen3 with Qwen3's chat template (made in a temporary folder): the OpenAI text routes.
         "llm chat": (None, ["/v1/chat/completions", "/v1/completions", "/v1/responses"])}
# A valid body for every route, so that half the soak is valid requests with one field fuzzed (fully
# random bodies are almost never valid, and would leave the jobs themselves unexercised).
VALID = {"prompt": "a cat", "content": "a cat", "input": ["a cat", "a dog"], "tokens": [1, 2, 3], "width": 32,
         "height": 32, "steps": 1, "seed": 1, "options": {"num_predict": 4}}
# The chat routes' own: /v1/responses reads `input` as a string or items ("a cat" or [...] above, both valid).
VALID_CHAT = {"messages": [{"role": "user", "content": "a cat"}], "input": "a cat", "prompt": "a cat",
              "max_tokens": 4, "max_output_tokens": 4, "temperature": 0}
CHAT_FIELDS = ["messages", "input", "tools", "tool_choice", "response_format", "text", "instructions", "stream",
               "previous_response_id", "reasoning", "include", "top_logprobs", "logprobs", "stop", "seed"]
one_field_fuzzed = st.builds(lambda name, value: {**VALID, name: value},
                             st.sampled_from(sorted(VALID) + ["guidance", "negative_prompt", "images", "normalize",
                                                              "truncate", "encoding_format", "dimensions"]),
                             json_values)
one_chat_field_fuzzed = st.builds(lambda name, value: {**VALID_CHAT, name: value}, st.sampled_from(CHAT_FIELDS),
                                  json_values) | response_items.map(lambda items: {**VALID_CHAT, "input": items})
FIGURES: dict[str, collections.Counter] = {}


def bounded(body: dict) -> dict:
    """The same body with the work it may ask for kept small, so a soak of valid requests stays minutes."""
    body = dict(body)
    for name, most in (("steps", 1), ("width", 32), ("height", 32)):
        value = body.get(name)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is None or (is_number and (value > most or value == 0)):  # absent or 0: the model's default
            body[name] = most
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):  # the OpenAI routes' budgets
        if not isinstance(body.get(name), int) or isinstance(body.get(name), bool) or body[name] > 8:
            body[name] = 8
    options = body.get("options")
    if isinstance(options, dict) and isinstance(options.get("num_predict"), int):
        # -1 and -2 mean "until the context is full": 8 tokens too.
        predict = options["num_predict"]
        body["options"] = {**options, "num_predict": 8 if predict < 0 else min(predict, 8)}
    elif isinstance(options, dict) or "options" not in body:
        body["options"] = {**(options or {}), "num_predict": 8}
    return body


def send(runner: Runner, path: str, body: dict, figures: collections.Counter) -> None:
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=HANG_SECONDS)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        figures[f"{response.status // 100}xx"] += 1
        if response.status >= 500:
            figures["5xx bodies"] += 1
            print(f"5xx on {path}: {body!r:.200}")
    except TimeoutError:
        figures["hangs"] += 1
    except OSError:
        figures["connection errors"] += 1
    finally:
        conn.close()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_soak(mode, tmp_path):
    model, paths = MODES[mode]
    figures = FIGURES[mode] = collections.Counter()
    requests = bodies | one_chat_field_fuzzed | st.just(VALID_CHAT) if model is None else \
        bodies | one_field_fuzzed | st.just(VALID)
    with Runner.start(model or str(chat_model_folder(tmp_path)), timeout=120) as runner:

        @settings(max_examples=REQUESTS_PER_MODE, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=requests, path=st.sampled_from(paths))
        def fuzz(body, path):
            send(runner, path, bounded(body), figures)

        fuzz()
        figures["runner alive"] = int(runner.process.poll() is None and runner.health()["status"] == "ok")
    print(f"\nsoak {mode}: {dict(figures)}")
    assert figures["5xx"] == figures["hangs"] == figures["connection errors"] == 0 and figures["runner alive"]
