"""`--mlx-engine`: Ollama's current LLM runner wire, byte for byte, over real HTTP to a runner subprocess.

What Ollama's x/mlxrunner Client sends and reads (its CompletionRequest / CompletionResponse structs,
Go field names with no JSON tags) is written out here as raw bytes, so these tests check the wire
itself, not a Python client's reading of it.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import pytest
from conftest import run_cli

from mlxrunner.launcher import Runner

QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"
LLAMA3 = QWEN3.parent / "llama3-tiny"
CONTEXT = 4096  # the fixtures' max_position_embeddings

# Go's CompletionResponse, in its field order: every line has all of them.
LINE_FIELDS = ["Content", "Done", "DoneReason", "PromptEvalCount", "PromptEvalDuration", "EvalCount",
               "EvalDuration", "Logprobs", "Error"]


@pytest.fixture(scope="module")
def engine():
    with Runner.start(str(QWEN3), timeout=120, extra_args=["--mlx-engine"]) as runner:
        yield runner


def request(runner: Runner, method: str, path: str, body: bytes | None = None,
            content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def complete(runner: Runner, body: dict, path: str = "/completion") -> list[dict]:
    status, headers, raw = request(runner, "POST", path, json.dumps(body).encode())
    assert status == 200, raw
    assert headers["content-type"] == "application/jsonl"
    assert raw.endswith(b"\n")
    lines = [json.loads(line, object_pairs_hook=ordered_keys) for line in raw.split(b"\n")[:-1]]
    return lines


def ordered_keys(pairs: list) -> dict:
    obj = dict(pairs)
    obj["__order__"] = [k for k, _ in pairs]
    return obj


def text_of(lines: list[dict]) -> str:
    return "".join(line["Content"] for line in lines)


def test_status_has_gos_field_names_and_health_answers_the_same(engine):
    for path in ("/v1/status", "/health"):
        status, headers, raw = request(engine, "GET", path)
        assert status == 200 and headers["content-type"].startswith("application/json") and raw.endswith(b"\n")
        body = json.loads(raw)
        assert list(body) == ["Status", "Progress", "ContextLength", "Memory"]
        assert body["Status"] == 0 and body["Progress"] == 100 and body["ContextLength"] == CONTEXT
        assert isinstance(body["Memory"], int) and body["Memory"] > 0


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_models_says_success(engine, method):
    status, _, raw = request(engine, method, "/v1/models", b"{}" if method == "POST" else None)
    assert status == 200 and json.loads(raw) == {"Success": True}


@pytest.mark.parametrize("path", ["/completion", "/v1/completions"])
def test_stream_lines_carry_every_field_in_gos_order(engine, path):
    lines = complete(engine, {"Prompt": "Hello", "Options": {"num_predict": 8}, "Logprobs": False,
                              "TopLogprobs": 0}, path)
    assert all(line.pop("__order__") == LINE_FIELDS for line in lines)
    chunks, final = lines[:-1], lines[-1]
    for chunk in chunks:
        assert chunk["Content"] and chunk["Done"] is False and chunk["Error"] is None and chunk["Logprobs"] is None
        assert [chunk[k] for k in LINE_FIELDS[2:7]] == [0, 0, 0, 0, 0]
    assert final["Content"] == "" and final["Done"] is True and final["Error"] is None and final["Logprobs"] is None
    assert final["DoneReason"] in (0, 1)
    if final["DoneReason"] == 1:
        assert final["EvalCount"] == 8
    assert final["PromptEvalCount"] >= 1
    assert all(isinstance(final[k], int) and final[k] > 0 for k in ("PromptEvalDuration", "EvalDuration"))


def test_both_paths_and_any_letter_case_give_the_same_greedy_text(engine):
    # No temperature is Go's zero value: greedy, so every call gives the same text.
    capitalised = text_of(complete(engine, {"Prompt": "Once upon", "Options": {"num_predict": 16}}))
    lower = text_of(complete(engine, {"prompt": "Once upon", "options": {"NUM_PREDICT": 16}}, "/v1/completions"))
    explicit = text_of(complete(engine, {"prompt": "Once upon", "options": {"num_predict": 16, "temperature": 0},
                                         "top_logprobs": 3, "logprobs": True}))
    assert capitalised and capitalised == lower == explicit


def test_go_zero_values_seed_0_is_seeded_and_repeat_last_n_0_turns_penalties_off(engine):
    def text(**options):
        return text_of(complete(engine, {"Prompt": "Once upon", "Options": {"num_predict": 24, **options}}))

    assert text(temperature=1.5) == text(temperature=1.5)  # seed absent = 0: seeded, so repeatable
    assert text(repeat_penalty=3.0) == text()  # repeat_last_n absent = 0: no penalty at all
    # Values only Ollama's ranges allow mean what they mean there (negative temperature: greedy; top_p 1.5,
    # top_k -1, min_p 2: off; num_predict -1: until the context is full, here cut by num_predict's cap below).
    assert text(temperature=-1, top_p=1.5, top_k=-1, min_p=2, repeat_last_n=-5, repeat_penalty=-1) == text()


def test_logprobs_come_with_the_chunks_their_tokens_make(engine):
    lines = complete(engine, {"Prompt": "Once upon", "Options": {"num_predict": 12}, "Logprobs": True,
                              "TopLogprobs": 3})
    chunks, final = lines[:-1], lines[-1]
    entries = [entry for chunk in chunks for entry in chunk["Logprobs"]]
    assert all(chunk["Logprobs"] for chunk in chunks)  # every chunk's text came from at least one token
    assert len(entries) == final["EvalCount"] and final["Logprobs"] is None
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["logprob"] <= 0
        # Go's zero temperature is greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(top[0]["logprob"]) and entry["token"] == top[0]["token"]
    # Without Logprobs there are none, whatever TopLogprobs says.
    assert all(line["Logprobs"] is None for line in complete(engine, {"Prompt": "Once upon", "TopLogprobs": 3,
                                                                      "Options": {"num_predict": 4}}))


def test_num_predict_is_capped_at_the_context_left(engine):
    _, _, raw = request(engine, "POST", "/v1/tokenize", b"a " * 2000, "text/plain")
    prompt_tokens = len(json.loads(raw))
    words = 2000 + (CONTEXT - 3 - prompt_tokens)  # one token per "a " past the first: 3 tokens left
    _, _, raw = request(engine, "POST", "/v1/tokenize", b"a " * words, "text/plain")
    left = CONTEXT - len(json.loads(raw))
    assert 0 < left <= 6
    final = complete(engine, {"Prompt": "a " * words, "Options": {"num_predict": 100}})[-1]
    assert final["PromptEvalCount"] == CONTEXT - left
    assert final["EvalCount"] <= left and (final["DoneReason"] == 0 or final["EvalCount"] == left)


def test_tokenize_takes_the_raw_body_and_answers_a_bare_array(engine):
    from mlxrunner import store
    from mlxrunner.text.tokenizer import TextTokenizer

    status, _, raw = request(engine, "POST", "/v1/tokenize", "Hello wörld".encode(), "text/plain")
    assert status == 200 and raw.endswith(b"\n")
    tokenizer = TextTokenizer.from_source(store.resolve(str(QWEN3)))
    assert json.loads(raw) == tokenizer.encode("Hello wörld", add_bos=True)


def test_tokenize_adds_bos_where_the_tokenizer_does():
    from mlxrunner import store
    from mlxrunner.text.tokenizer import TextTokenizer

    with Runner.start(str(LLAMA3), timeout=120, extra_args=["--mlx-engine"]) as runner:
        status, _, raw = request(runner, "POST", "/v1/tokenize", b"Hello", "text/plain")
        final = complete(runner, {"Prompt": "Hello", "Options": {"num_predict": 2}})[-1]
    tokens = json.loads(raw)
    tokenizer = TextTokenizer.from_source(store.resolve(str(LLAMA3)))
    assert status == 200 and tokens == [tokenizer.bos_id, *tokenizer.encode("Hello", add_bos=False)]
    assert final["PromptEvalCount"] == len(tokens)


@pytest.mark.parametrize("body, status, message", [
    (b'{"Prompt": ""}', 400, "empty prompt\n"),
    (b'{"Prompt": "a' + b" a" * 4199 + b'"}', 400,  # "a" and " a" are one token each
     "input length (4200 tokens) exceeds the model's maximum context length (4096 tokens)\n"),
    (b"{not json", 400,
     "request body is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2\n"),
    (b'{"Prompt": 5}', 400, 'field "Prompt" must be a string, got a number\n'),
    (b'{"Prompt": "hi", "Options": {"temperature": "hot"}}', 400,
     'field "options.temperature" must be a number, got a string\n'),
])
def test_errors_before_the_stream_are_plain_text_as_gos_http_error(engine, body, status, message):
    got_status, headers, raw = request(engine, "POST", "/completion", body)
    assert got_status == status and headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert raw.decode() == message


def test_routes_of_our_own_protocol_are_not_served(engine):
    for method, path in (("POST", "/embedding"), ("POST", "/tokenize"), ("POST", "/v1/embeddings")):
        status, headers, raw = request(engine, method, path, b"{}")
        assert status == 404 and headers["content-type"].startswith("text/plain"), (path, raw)


def test_in_stream_error_line_is_gos_status_error():
    from mlxrunner.http.mlx_engine import EngineLine
    from mlxrunner.http.server import HttpError

    line = json.dumps(EngineLine(error=HttpError(500, "the model failed: boom")).to_json(), separators=(",", ":"))
    assert line == ('{"Content":"","Done":false,"DoneReason":0,"PromptEvalCount":0,"PromptEvalDuration":0,'
                    '"EvalCount":0,"EvalDuration":0,"Logprobs":null,'
                    '"Error":{"StatusCode":500,"Status":"","error":"the model failed: boom"}}')


@pytest.mark.parametrize("model, mode", [("all-minilm", "an embedding model"),
                                         (str(Path(__file__).parents[1] / "fixtures" / "zimage-tiny"),
                                          "an imagegen model")])
def test_a_model_that_is_not_an_llm_exits_1_at_once(model, mode):
    start = time.monotonic()
    result = run_cli("runner", "--mlx-engine", "--model", model, "--port", "0")
    assert result.returncode == 1 and time.monotonic() - start < 30
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and mode in line and "this runner serves only llm models" in line
    assert "mlx runner ready" not in result.stderr
