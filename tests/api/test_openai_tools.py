"""Tool calls and reasoning on /v1/chat/completions, from the real `openai` client over real HTTP.

The tiny fixture models are random and never write `<think>` or `<tool_call>`, so here the runner's real app
serves a scripted LLM (tests/scripted_llm.py): Qwen3's real chat template, and an answer written in advance,
handed out in small pieces so that tags are split across chunks as a model splits them.
"""

from __future__ import annotations

import json

import openai
import pytest
from scripted_llm import QWEN3_CHAT, ScriptedApps

from mlxrunner.text.chat_template import ChatTemplate

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
THINK_THEN_CALL = ('<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n'
                   '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


@pytest.fixture
def serve():
    """start(answer, error=None) -> (client, model); `started` holds the apps (their `state`), closed at the end."""
    scripted = ScriptedApps()
    yield scripted.start, scripted.apps
    scripted.close()


@pytest.fixture
def serve_answer(serve):
    return serve[0]


def test_an_answer_held_to_json_is_all_content_whatever_its_strings_hold(serve_answer):
    held = '{"note": "<think>not reasoning</think>", "call": "<tool_call>{}</tool_call>"}'
    client, _ = serve_answer(held)
    answer = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER_TOOL],
                                            response_format={"type": "json_object"})
    message = answer.choices[0].message
    assert message.content == held and not message.tool_calls and "reasoning_content" not in message.model_extra
    chunks = client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"},
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == held


CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call(serve_answer, tool_choice):
    # The prompt ends with the block's opening, so the answer is the call's JSON (held to the tool's schema by
    # the real model; scripted here).
    client, model = serve_answer(CALL_JSON)
    answer = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER_TOOL], tool_choice=tool_choice)
    assert model.prompts[-1].endswith("<|im_start|>assistant\n<tool_call>\n")
    assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.content is None
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER_TOOL],
                                                 tool_choice=tool_choice, stream=True))
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert [tc.function.name for tc in streamed] == ["get_weather"] and chunks[-1].choices[0].finish_reason == \
        "tool_calls"


def test_a_forced_call_follows_a_tool_schema_with_definitions(serve_answer):
    # Pydantic writes a nested model as "#/$defs/..." references, relative to the parameters' root.
    place = {"type": "function", "function": {"name": "go", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["to"],
        "properties": {"to": {"$ref": "#/$defs/Place"}},
        "$defs": {"Place": {"type": "object", "additionalProperties": False, "required": ["city"],
                            "properties": {"city": {"type": "string"}}}}}}}
    client, _ = serve_answer('{"name": "go", "arguments": {"to": {"city": "Paris"}}}')
    answer = client.chat.completions.create(model="m", messages=ASK, tools=[place], tool_choice="required")
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "go" and json.loads(call.function.arguments) == {"to": {"city": "Paris"}}


@pytest.mark.parametrize("fields, words", [
    ({"tool_choice": "required"}, "offers no tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "'get_time', which is not one of the tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "always"}, '"required"'),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": "get_weather"}}, '"required"'),
    ({"tools": [WEATHER_TOOL], "tool_choice": ["required"]}, '"required"'),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "send one"),
])
def test_a_tool_choice_that_cannot_be_followed_is_a_400(serve_answer, fields, words):
    client, _ = serve_answer(CALL_JSON)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=ASK, **fields)
    assert caught.value.param == "tool_choice" and words in caught.value.message


def test_a_forced_call_needs_a_template_that_writes_tool_call_blocks(serve):
    start, started = serve
    client, model = start(CALL_JSON)
    model.chat_template = ChatTemplate.from_folder(QWEN3_CHAT.parent / "llama3.1")  # JSON calls, no <tool_call>
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER_TOOL], tool_choice="required")
    assert caught.value.param == "tool_choice" and "<tool_call>" in caught.value.message


def test_reasoning_and_a_tool_call_whole(serve_answer):
    client, model = serve_answer(THINK_THEN_CALL)
    answer = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER_TOOL])
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.model_extra["reasoning_content"] == "The user wants the weather."
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "get_weather" in model.prompts[-1]  # the tools reached the template


def test_reasoning_and_a_tool_call_streamed(serve_answer):
    client, _ = serve_answer(THINK_THEN_CALL)
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER_TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "The user wants the weather."
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_a_tool_call_block_stays_text(serve_answer):
    client, _ = serve_answer("Sure. <tool_call>\n{\"name\": \"x\"}\n</tool_call>")
    answer = client.chat.completions.create(model="m", messages=ASK)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content == "Sure. <tool_call>\n{\"name\": \"x\"}\n</tool_call>"
    assert answer.choices[0].finish_reason == "stop"


def test_tool_results_go_back_to_the_template(serve_answer):
    client, model = serve_answer("It is sunny.")
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(model="m", messages=history, tools=[WEATHER_TOOL])
    assert answer.choices[0].message.content == "It is sunny."
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in model.prompts[-1]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in model.prompts[-1]


def test_enable_thinking_false_reaches_the_template(serve_answer):
    client, model = serve_answer("Hi.")
    client.chat.completions.create(model="m", messages=ASK, extra_body={"chat_template_kwargs": {
        "enable_thinking": False}})
    assert model.prompts[-1].endswith("<think>\n\n</think>\n\n")


def test_an_error_midway_through_a_stream_is_an_error_event(serve_answer):
    client, _ = serve_answer("Some text before it fails", ValueError("a shape check failed"))
    stream = client.chat.completions.create(model="m", messages=ASK, stream=True)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "a shape check failed" in caught.value.message


def test_an_internal_error_is_a_500_the_client_does_not_retry(serve_answer):
    client, model = serve_answer("", ValueError("a shape check failed"))
    response = client.with_options(max_retries=2).chat.completions.with_raw_response
    with pytest.raises(openai.InternalServerError) as caught:
        response.create(model="m", messages=ASK)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.body["type"] == "server_error"
    assert len(model.prompts) == 1  # asked once: no retries


def test_while_loading_a_503_says_when_to_retry(serve):
    start, apps = serve
    client, _ = start("")
    apps[-1].state.status = "loading"
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.with_raw_response.create(model="m", messages=ASK)
    assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "1"
    assert "loading" in caught.value.message
