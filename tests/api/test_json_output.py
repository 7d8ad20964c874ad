"""Answers held to one JSON object: OpenAI's `response_format` (`json_object`, `json_schema`) and `/completion`'s
`format` ("json", a schema), on the tiny Qwen3 with Qwen3's chat template, in-process and through a real runner.

The recogniser itself is tested against json.loads (tests/unit/test_json_grammar.py). Here: greedy decoding held to
JSON takes, at every step, the best token the recogniser allows (checked against the model's own logits, masked);
sampled answers are always JSON as far as they go, and whole objects when they stop on their own; the protocols
route the requests (outside the batch) and refuse the schemas they cannot hold an answer to, naming where.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Literal

import jsonschema
import numpy as np
import openai
import pytest
from conftest import chat_model_folder
from pydantic import BaseModel, ConfigDict

from mlxrunner import _core
from mlxrunner.launcher import Runner
from mlxrunner.llm.model import core_schema
from mlxrunner.request import Options
from mlxrunner.text.json_schema import compile_schema

PROMPT = "Describe a cat as JSON:"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "llm"


class Cat(BaseModel):
    """A schema whose documents are short whatever the model prefers: two keys, each value one of a few."""

    model_config = ConfigDict(extra="forbid")
    mood: Literal["calm", "angry"]
    indoor: bool


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return chat_model_folder(tmp_path_factory.mktemp("qwen3-chat-json"))


@pytest.fixture(scope="module")
def model(chat_model):
    from mlxrunner import llm

    return llm.load(str(chat_model))


@pytest.fixture(scope="module")
def runner(chat_model):
    with Runner.start(str(chat_model), timeout=120, extra_args=["--max-batch", "4"]) as runner:
        yield runner


@pytest.fixture(scope="module")
def client(runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{runner.host}:{runner.port}/v1", api_key="unused", max_retries=0)


def run(model, prompt: str, json_schema=None, **options) -> tuple[str, object]:
    text, final = "", None
    for item in model.stream(prompt, Options(**options), json_output=True, json_schema=json_schema):
        if isinstance(item, str):
            text += item
        elif hasattr(item, "stop_reason"):
            final = item
    return text, final


def is_json_so_far(text: str) -> bool:
    return _core.JsonGrammar().feed(text.encode())


def masked_argmax(model, ids: list[int], tokens: int, compiled, repeat_penalty: float = 1.0,
                  window: int = 64) -> tuple[list[int], bool]:
    """The reference: at each step the model's own logits for the whole text so far (no cache), with Ollama's
    repeat penalty over the last `window` tokens, masked by the recogniser, and their best; (the tokens, whether
    the object closed)."""
    vocab_size = model.core_config.vocab_size
    if compiled:
        constraint = _core.JsonConstraint(model.json_vocabulary, vocab_size, core_schema(compiled))
    else:
        constraint = _core.JsonConstraint(model.json_vocabulary, vocab_size)
    expected: list[int] = []
    for _ in range(tokens):
        logits = model.logits(ids + expected)[-1].astype(np.float32)
        for seen in set((ids + expected)[-window:]) if repeat_penalty != 1.0 else ():
            logits[seen] = logits[seen] * repeat_penalty if logits[seen] < 0 else logits[seen] / repeat_penalty
        token = int(np.argmax(logits + np.asarray(constraint.mask())))
        constraint.accept(token)
        expected.append(token)
        if constraint.complete:
            break
    return expected, constraint.complete


@pytest.mark.parametrize("schema, repeat_penalty", [(None, 1.0), (Cat.model_json_schema(), 1.0), (None, 1.5)],
                         ids=["any object", "a schema", "with the repeat penalty"])
def test_greedy_takes_the_best_allowed_token_at_every_step(model, schema, repeat_penalty):
    # Full caches: each step is dispatched before the token before it is checked, and taken back (the caches'
    # position, the penalty's history) when refused.
    compiled = compile_schema(schema) if schema else None
    expected, closed = masked_argmax(model, model.encode_prompt(PROMPT), 24, compiled, repeat_penalty)
    text, final = run(model, PROMPT, json_schema=compiled, temperature=0, repeat_penalty=repeat_penalty,
                      num_predict=24)
    assert text == model.detokenize(expected)
    assert final.stop_reason == ("json" if closed else "num_predict")
    assert is_json_so_far(text) and text.startswith("{")


def test_greedy_on_a_model_with_sliding_window_layers():
    # Rotating caches cannot forget a position: each token is checked before the next step.
    from mlxrunner import llm

    model = llm.load(str(FIXTURES / "gemma3-tiny"))
    expected, closed = masked_argmax(model, model.encode_prompt(PROMPT), 24, None)
    text, final = run(model, PROMPT, temperature=0, repeat_penalty=1.0, num_predict=24)
    assert text == model.detokenize(expected) and is_json_so_far(text)


def test_sampled_answers_are_json_as_far_as_they_go_and_whole_when_they_stop(model):
    finished = 0
    for seed in range(24):
        text, final = run(model, PROMPT, temperature=1.0, seed=seed, num_predict=48)
        assert is_json_so_far(text), text
        if final.stop_reason == "json":
            finished += 1
            assert isinstance(json.loads(text), dict)
            assert final.done_reason == "stop"
        else:
            assert final.stop_reason == "num_predict" and final.eval_count == 48
    assert finished > 0  # the tiny model closes some of its objects within 48 tokens


def test_the_same_request_without_json_is_free_text(model):
    text = "".join(i for i in model.stream(PROMPT, Options(temperature=0, num_predict=24)) if isinstance(i, str))
    assert not is_json_so_far(text)  # so the tests above test something


def test_openai_json_object_answers_hold_json(client):
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], temperature=0,
                                            max_tokens=40, response_format={"type": "json_object"})
    content = answer.choices[0].message.content
    assert is_json_so_far(content) and content.startswith("{")
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], temperature=0,
                                            max_tokens=40, response_format={"type": "json_object"}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content


def test_openai_parse_with_a_pydantic_model(client):
    # The openai client's structured outputs: it sends response_format json_schema (strict) from the model class
    # and parses the answer into it. Held to Cat, even the random-weight model writes a Cat.
    answer = client.beta.chat.completions.parse(model="m", messages=[{"role": "user", "content": PROMPT}],
                                                temperature=0, max_tokens=400, response_format=Cat)
    assert answer.choices[0].finish_reason == "stop"
    cat = answer.choices[0].message.parsed
    assert isinstance(cat, Cat) and cat.mood in ("calm", "angry")


def test_sampled_answers_held_to_a_schema_follow_it(model):
    schema = Cat.model_json_schema()
    for seed in range(4):
        text, final = run(model, PROMPT, json_schema=compile_schema(schema), temperature=1.0, seed=seed,
                          num_predict=400)
        assert final.stop_reason == "json", text
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"}}}, "properties.name.pattern"),
    ({"type": "array"}, "root must be an object"),
])
def test_openai_schemas_that_cannot_be_held_to_are_400s_naming_the_field(client, schema, where):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema}})
    assert caught.value.param == "response_format" and where in caught.value.message


def native(runner: Runner, body: dict) -> tuple[str, dict]:
    lines = list(runner.complete(body))
    return "".join(line.get("content", "") for line in lines[:-1]), lines[-1]


def test_native_format_json_and_its_prompt_cache(runner):
    body = {"prompt": PROMPT, "format": "json", "options": {"temperature": 0, "repeat_penalty": 1.0,
                                                             "num_predict": 30}}
    first_text, first = native(runner, body)
    assert is_json_so_far(first_text) and first["stop_reason"] in ("json", "num_predict")
    again_text, again = native(runner, body)
    assert again_text == first_text and again["prompt_cache_count"] > 0


def test_native_format_schema(runner):
    schema = Cat.model_json_schema()
    text, final = native(runner, {"prompt": PROMPT, "format": schema, "options": {"num_predict": 400, "seed": 3}})
    assert final["stop_reason"] == "json"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("value", [{"type": "object", "properties": {"a": {"pattern": "x"}}}, "xml", 1])
def test_native_format_other_than_json_is_a_400_naming_it(runner, value):
    with pytest.raises(Exception) as caught:
        native(runner, {"prompt": PROMPT, "format": value})
    assert '"format"' in str(caught.value)


def test_json_requests_run_beside_a_batch_without_changing_its_answers(runner):
    def plain(i: int) -> dict:
        return {"prompt": f"{PROMPT} {i}", "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 20}}

    def held(i: int) -> dict:
        return {**plain(i), "format": "json"}

    bodies = [plain(0), held(1), plain(2), held(3), plain(4)]
    alone = [native(runner, body)[0] for body in bodies]
    together: list[str | None] = [None] * len(bodies)

    def send(index: int) -> None:
        together[index] = native(runner, bodies[index])[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone
    assert all(is_json_so_far(alone[i]) for i in (1, 3))


UNIT_TOOL = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["unit"],
    "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}}}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "set_unit"}}])
def test_the_model_writes_the_forced_call_its_schema_allows(client, tool_choice):
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Use celsius."}],
                                            tools=[UNIT_TOOL], tool_choice=tool_choice, temperature=0,
                                            max_tokens=300)
    assert answer.choices[0].finish_reason == "tool_calls"
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "set_unit"
    jsonschema.validate(json.loads(call.function.arguments), UNIT_TOOL["function"]["parameters"])
