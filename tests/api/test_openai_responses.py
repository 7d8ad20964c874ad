"""/v1/responses (OpenAI's Responses API) from the real `openai` client over real HTTP.

Two servers: a real runner subprocess with the tiny Qwen3 and Qwen3's chat template (greedy text against
/v1/chat/completions on the same conversation, streams, stored responses and previous_response_id, the prompt
cache, logprobs, JSON output, errors), and the runner's real app serving a scripted answer (tests/scripted_llm.py)
for what a random model never writes: reasoning, function calls and their outputs, a failure midway.
"""

from __future__ import annotations

import json
import time

import openai
import pytest
from conftest import chat_model_folder
from scripted_llm import ScriptedApps

from mlxrunner.launcher import Runner

INSTRUCTIONS = "You are terse."
HELLO = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "Hello there"}]
FUNCTION_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in FUNCTION_TOOL.items() if k != "type"}}
THINK_THEN_CALL = ('<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n'
                   '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    with Runner.start(str(chat_model_folder(tmp_path_factory.mktemp("qwen3-chat"))), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def client(runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{runner.host}:{runner.port}/v1", api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, **fields):
    return client.responses.create(model="m", temperature=0, **fields)


def chat_greedy(client: openai.OpenAI, messages: list[dict], max_tokens: int):
    return client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=max_tokens)


def test_greedy_text_and_usage_equal_chat_completions(client):
    answer = greedy(client, instructions=INSTRUCTIONS, input="Hello there", max_output_tokens=16)
    chat = chat_greedy(client, HELLO, 16)
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.usage.output_tokens == chat.usage.completion_tokens
    assert answer.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert answer.status == ("incomplete" if cut else "completed")
    assert (answer.incomplete_details.reason if cut else answer.incomplete_details) == (
        "max_output_tokens" if cut else None)
    assert answer.object == "response" and answer.id.startswith("resp_") and answer.instructions == INSTRUCTIONS
    (message,) = answer.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text"


def test_input_items_render_as_the_same_chat(client):
    items = [{"role": "developer", "content": INSTRUCTIONS},  # developer is the chat's system
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}]
    assert greedy(client, input=items, max_output_tokens=12).output_text == \
        chat_greedy(client, HELLO, 12).choices[0].message.content


def test_a_stream_makes_the_same_response_event_by_event(client):
    whole = greedy(client, instructions=INSTRUCTIONS, input="Hello there", max_output_tokens=12)
    events = list(greedy(client, instructions=INSTRUCTIONS, input="Hello there", max_output_tokens=12, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert len({e.response.id for e in events if e.type.count(".") == 1}) == 1
    # The SDK's own stream helper checks each item's identity from its opening to its close (its final response is
    # a completed one's: a cut answer ends with response.incomplete, which carries the response).
    with client.responses.stream(model="m", temperature=0, instructions=INSTRUCTIONS, input="Hello there",
                                 max_output_tokens=12) as stream:
        helped = list(stream)
    assert "".join(e.delta for e in helped if e.type == "response.output_text.delta") == whole.output_text
    assert helped[-1].type == f"response.{whole.status}" and helped[-1].response.output_text == whole.output_text


def test_previous_response_id_continues_the_conversation_from_the_prompt_cache(client):
    first = greedy(client, instructions=INSTRUCTIONS, input="Hello there", max_output_tokens=8)
    second = greedy(client, instructions=INSTRUCTIONS, previous_response_id=first.id, input="And then?",
                    max_output_tokens=8)
    history = HELLO + [{"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And then?"}]
    chat = chat_greedy(client, history, 8)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.previous_response_id == first.id
    # The first turn's prompt came from the prompt cache; its answer's tokens too, where they tokenize the same.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_instructions_are_not_carried_over(client):
    first = greedy(client, instructions=INSTRUCTIONS, input="Hello there", max_output_tokens=6)
    second = greedy(client, previous_response_id=first.id, input="And then?", max_output_tokens=6)
    history = [HELLO[1], {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And then?"}]
    assert second.output_text == chat_greedy(client, history, 6).choices[0].message.content
    assert second.instructions is None


def test_a_stored_response_is_retrieved_continued_and_deleted(client):
    answer = greedy(client, input="Hello there", max_output_tokens=5)
    kept = client.responses.retrieve(answer.id)
    assert kept.id == answer.id and kept.output_text == answer.output_text and kept.status == answer.status
    assert kept.usage.model_dump() == answer.usage.model_dump()
    client.responses.delete(answer.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(answer.id)
    assert caught.value.body["param"] == "response_id"
    with pytest.raises(openai.NotFoundError) as caught:
        greedy(client, previous_response_id=answer.id, input="More")
    assert caught.value.body["param"] == "previous_response_id" and answer.id in caught.value.message


def test_a_stored_responses_input_items_are_listed_a_page_at_a_time(client):
    items = [{"role": "developer", "content": INSTRUCTIONS}, {"role": "user", "content": "Hello there"},
             {"role": "assistant", "content": "Hi."}, {"role": "user", "content": [{"type": "input_text",
                                                                                  "text": "And then?"}]}]
    answer = greedy(client, input=items, max_output_tokens=2)
    listed = list(client.responses.input_items.list(answer.id, order="asc", limit=3))  # the client pages on
    assert [(i.role, i.content[0].type, i.content[0].text) for i in listed] == [
        ("developer", "input_text", INSTRUCTIONS), ("user", "input_text", "Hello there"),
        ("assistant", "output_text", "Hi."), ("user", "input_text", "And then?")]
    assert all(i.type == "message" and i.id.startswith("msg_") for i in listed)
    page = client.responses.input_items.list(answer.id, limit=2)  # newest first by default
    assert [i.id for i in page.data] == [i.id for i in listed[::-1][:2]] and page.has_more
    (only,) = client.responses.input_items.list(greedy(client, input="Hi", max_output_tokens=1).id).data
    assert only.role == "user" and only.content[0].text == "Hi"
    for query, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "msg_nope"}, "after")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.input_items.list(answer.id, extra_query=query)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nope")


def test_store_false_keeps_nothing(client):
    answer = greedy(client, input="Hello there", max_output_tokens=3, store=False)
    assert answer.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(answer.id)


def test_logprobs_are_chat_completions_logprobs(client):
    answer = greedy(client, instructions=INSTRUCTIONS, input="Hello there", max_output_tokens=6, top_logprobs=2,
                    include=["message.output_text.logprobs"])
    chat = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=6, logprobs=True,
                                          top_logprobs=2)
    ours = answer.output[0].content[0].logprobs
    theirs = chat.choices[0].logprobs.content
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in ours] == \
        [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in theirs]
    assert len(ours) == answer.usage.output_tokens


def test_text_format_json_schema_holds_the_answer_to_the_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    schema["properties"]["city"]["maxLength"] = 12  # the random model would write on until the token budget
    answer = client.responses.create(model="m", input="Plan a trip", max_output_tokens=200, text={
        "format": {"type": "json_schema", "name": "trip", "schema": schema, "strict": True}})
    value = json.loads(answer.output_text)
    assert set(value) == {"city", "days"} and isinstance(value["city"], str) and isinstance(value["days"], int)


def test_the_clients_parse_reads_a_pydantic_model_back(client):
    from pydantic import BaseModel, Field

    class Trip(BaseModel):
        city: str = Field(max_length=12)  # the random model would write on until the token budget
        days: int

    answer = client.responses.parse(model="m", input="Plan a trip", max_output_tokens=200, text_format=Trip)
    assert isinstance(answer.output_parsed, Trip) and answer.output_parsed == Trip.model_validate_json(
        answer.output_text)


@pytest.mark.parametrize("fields, param, words", [
    ({}, "input", "must be a string or a non-empty array"),
    ({"input": []}, "input", "an empty array"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0]", "text only"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "robot"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "previous_response_id"),
    ({"input": [{"type": "web_search_call"}]}, "input[0].type", "web_search_call"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id", "must be a string"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]", "function tools only"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice", "offers no tools"),
    ({"input": "hi", "tools": [FUNCTION_TOOL], "tool_choice": {"type": "function", "name": "get_time"}},
     "tool_choice", "get_time"),
    ({"input": "hi", "tools": [FUNCTION_TOOL], "tool_choice": {"type": "allowed_tools", "tools": []}},
     "tool_choice", '{"type": "function", "name": ...}'),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
     "text.format", "text.format"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format", "xml"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "json_schema": {}}}}, "text.format", '"schema"'),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"input": "hi", "temperature": "hot"}, "temperature", "number"),
    ({"input": "hi", "background": True}, "background", "background"),
    ({"input": "hi", "instructions": 7}, "instructions", "string"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort", "extreme"),
])
def test_bad_requests_are_400s_naming_the_field(client, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", extra_body=fields) if "input" not in fields else \
            client.responses.create(model="m", **{k: v for k, v in fields.items() if k == "input"},
                                    extra_body={k: v for k, v in fields.items() if k != "input"})
    assert caught.value.body["param"] == param and words in caught.value.message, caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_is_a_400_before_any_event(client, stream):
    # The tiny Qwen3's context is 4,096 tokens; a streamed request's first event waits for the prompt to be taken.
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", input="hello " * 5000, stream=stream)
    assert "context" in caught.value.message


def test_the_runner_still_serves_after_bad_requests(client):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input=[{"role": "robot", "content": "hi"}])
    assert greedy(client, input="Hello there", max_output_tokens=2).status in ("completed", "incomplete")


def test_a_client_that_leaves_mid_stream_cancels_its_job(client, runner):
    def cancelled() -> int:
        return sum("(chat) cancelled: client disconnected" in line for line in list(runner.stderr_tail))

    before = cancelled()
    stream = greedy(client, input="Hello there", max_output_tokens=4000, stream=True)
    next(e for e in stream if e.type == "response.output_text.delta")
    stream.close()
    deadline = time.monotonic() + 30
    while cancelled() == before:
        assert time.monotonic() < deadline, list(runner.stderr_tail)[-5:]
        time.sleep(0.05)
    assert greedy(client, input="Hello there", max_output_tokens=2).status in ("completed", "incomplete")


# --- a scripted answer: reasoning, function calls, failures --------------------------------------------------------


@pytest.fixture
def scripted():
    apps = ScriptedApps()
    yield apps.start
    apps.close()


def test_reasoning_and_a_function_call_are_output_items(scripted):
    client, model = scripted(THINK_THEN_CALL)
    answer = client.responses.create(model="m", input="Weather in Paris?", tools=[FUNCTION_TOOL])
    reasoning, call = answer.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "The user wants the weather."
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris"} and call.id.startswith("fc_")
    assert answer.output_text == "" and answer.usage.output_tokens_details.reasoning_tokens > 0
    assert "get_weather" in model.prompts[0]  # the tool reached the template


def test_reasoning_and_a_function_call_streamed(scripted):
    client, _ = scripted(THINK_THEN_CALL)
    with client.responses.stream(model="m", input="Weather in Paris?", tools=[FUNCTION_TOOL]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == "The user wants the weather."
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == {"city": "Paris"}
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    assert final.output[1].name == "get_weather" and final.output[1].arguments == done.arguments


def test_function_call_outputs_go_back_to_the_template(scripted):
    client, model = scripted("It is sunny.")
    answer = client.responses.create(model="m", tools=[FUNCTION_TOOL], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}])
    assert answer.output_text == "It is sunny."
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in model.prompts[-1]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in model.prompts[-1]


def test_reasoning_items_go_back_to_the_template_with_their_turn(scripted):
    client, model = scripted("It is sunny.")
    client.responses.create(model="m", tools=[FUNCTION_TOOL], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},  # nothing to show
        {"type": "reasoning", "id": "rs_2", "summary": [],
         "content": [{"type": "reasoning_text", "text": "I should look it up."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    # Qwen3's template shows the reasoning of the turn after the last user message, before that turn's call.
    assert "<|im_start|>assistant\n<think>\nI should look it up.\n</think>\n\n<tool_call>" in model.prompts[-1]


def test_a_function_call_answered_by_previous_response_id(scripted):
    client, model = scripted(THINK_THEN_CALL)
    first = client.responses.create(model="m", input="Weather in Paris?", tools=[FUNCTION_TOOL])
    call = first.output[1]
    client.responses.create(model="m", previous_response_id=first.id, tools=[FUNCTION_TOOL],
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    prompt = model.prompts[-1]
    assert prompt.index("Weather in Paris?") < prompt.index(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>') < prompt.index(
        "<tool_response>\nsunny\n</tool_response>")


def test_reasoning_effort_none_turns_thinking_off_in_the_template(scripted):
    client, model = scripted("Hi.")
    answer = client.responses.create(model="m", input="Hello", reasoning={"effort": "none"})
    assert model.prompts[-1].endswith("<think>\n\n</think>\n\n") and answer.reasoning.effort == "none"
    client.responses.create(model="m", input="Hello", reasoning={"effort": "low"})
    assert model.prompts[-1].endswith("<|im_start|>assistant\n")  # Qwen3's template thinks unless told not to
    client.responses.create(model="m", input="Hello", reasoning={"effort": "none"},
                            extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert model.prompts[-1].endswith("<|im_start|>assistant\n")  # the request's own kwargs win


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_forced_function_call(scripted, tool_choice):
    client, model = scripted('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    answer = client.responses.create(model="m", input="Weather?", tools=[FUNCTION_TOOL], tool_choice=tool_choice)
    assert model.prompts[-1].endswith("<|im_start|>assistant\n<tool_call>\n")
    (call,) = answer.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


def test_a_failure_midway_ends_the_stream_with_response_failed(scripted):
    client, _ = scripted("Some text before it fails", ValueError("a shape check failed"))
    events = list(client.responses.create(model="m", input="Hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error.code == "server_error"
    assert "a shape check failed" in events[-1].response.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_failure_before_any_output_is_a_500(scripted):
    client, _ = scripted("", ValueError("a shape check failed"))
    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model="m", input="Hi")
    assert caught.value.body["type"] == "server_error"
