"""/v1/chat/completions, /v1/completions and /v1/models from the real `openai` client, against a real runner.

The runner serves the tiny Qwen3 fixture with Qwen3's chat template (tests/fixtures/chat/qwen3's
tokenizer_config.json, whose tokenizer is the fixture's own), copied into a temporary folder. The model is
random, so these tests check what the wire promises (greedy text equals /completion's on the same prompt,
streamed equals whole, usage, finish reasons, error shapes), not what it says.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import chat_model_folder

from mlxrunner.launcher import Runner
from mlxrunner.request import Options
from mlxrunner.text.chat_template import ChatTemplate

FIXTURES = Path(__file__).parents[1] / "fixtures"
QWEN3 = FIXTURES / "llm" / "qwen3-tiny"
HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return chat_model_folder(tmp_path_factory.mktemp("qwen3-chat"))


@pytest.fixture(scope="module")
def runner(chat_model):
    with Runner.start(str(chat_model), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def client(runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{runner.host}:{runner.port}/v1", api_key="unused", max_retries=0)


def greedy_completion(runner: Runner, prompt: str, num_predict: int) -> tuple[str, dict]:
    """/completion's greedy text and final line, with no penalties: what OpenAI's temperature 0 means."""
    lines = list(runner.complete({"prompt": prompt, "options": {"temperature": 0, "repeat_penalty": 1.0,
                                                                "num_predict": num_predict}}))
    return "".join(line.get("content", "") for line in lines[:-1]), lines[-1]


def test_models_lists_and_retrieves_the_loaded_model(client, chat_model):
    listed = client.models.list()
    assert [m.id for m in listed.data] == [str(chat_model)]
    card = client.models.retrieve(str(chat_model))  # the client sends its "/"s as %2F
    assert card.id == str(chat_model) and card.object == "model" and card.owned_by == "mlxrunner"
    assert card.created > 1_700_000_000
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["param"] == "model" and "no-such-model" in caught.value.body["message"]


def test_chat_greedy_equals_completion_greedy_on_the_rendered_prompt(client, runner, chat_model):
    prompt = ChatTemplate.from_folder(chat_model).render(HELLO)
    expected, final = greedy_completion(runner, prompt, 16)
    answer = client.chat.completions.create(model="anything", messages=HELLO, temperature=0, max_tokens=16)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == ("length" if final["done_reason"] == "length" else "stop")
    assert answer.usage.prompt_tokens == final["prompt_eval_count"]
    assert answer.usage.completion_tokens == final["eval_count"]
    assert answer.usage.total_tokens == final["prompt_eval_count"] + final["eval_count"]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == str(chat_model)


def test_chat_stream_sends_the_same_text_and_a_usage_chunk(client):
    whole = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    *with_choices, usage_chunk = chunks
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="m", messages=HELLO, max_tokens=3, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_max_tokens_ends_with_length(client):
    answer = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_completion_tokens=2,
                                            stop=None)
    assert answer.usage.completion_tokens <= 2
    if answer.usage.completion_tokens == 2:
        assert answer.choices[0].finish_reason == "length"


def test_seed_makes_sampling_repeatable(client):
    def sample() -> str:
        answer = client.chat.completions.create(model="m", messages=HELLO, seed=7, max_tokens=10, temperature=1.5)
        return answer.choices[0].message.content

    assert sample() == sample()


def test_stop_string_ends_the_answer_before_it(client):
    full = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=16)
    text = full.choices[0].message.content
    if len(text) < 4:
        pytest.skip("the random model stopped too soon to pick a stop string")
    stop = text[2:4]
    cut = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_tools_reach_the_template(client, chat_model):
    plain = client.chat.completions.create(model="m", messages=HELLO, max_tokens=1)
    with_tools = client.chat.completions.create(model="m", messages=HELLO, max_tokens=1, tools=[WEATHER_TOOL])
    rendered = ChatTemplate.from_folder(chat_model).render(HELLO, tools=[WEATHER_TOOL])
    assert "get_weather" in rendered
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens


def test_completions_greedy_equals_completion_greedy(client, runner):
    expected, final = greedy_completion(runner, "Once upon a time", 10)
    answer = client.completions.create(model="m", prompt="Once upon a time", temperature=0, max_tokens=10)
    assert answer.choices[0].text == expected and answer.object == "text_completion"
    assert answer.usage.prompt_tokens == final["prompt_eval_count"]
    assert answer.usage.completion_tokens == final["eval_count"]
    pieces = list(client.completions.create(model="m", prompt=["Once upon a time"], temperature=0, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == expected
    assert pieces[-1].choices == [] and pieces[-1].usage.completion_tokens == final["eval_count"]
    assert pieces[-2].choices[0].finish_reason == answer.choices[0].finish_reason


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": -1}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
])
def test_bad_chat_fields_are_400s_naming_the_field(client, fields, param):
    request = {"model": "m", "messages": HELLO, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    error = caught.value
    assert error.status_code == 400 and error.param == param and error.body["type"] == "invalid_request_error"
    assert set(error.body) == {"message", "type", "param", "code"}


def test_a_plain_text_response_format_is_the_default_answer(client):
    plain = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=6)
    text = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=6,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_logit_bias_bans_and_forces_tokens(client, chat_model):
    from mlxrunner.llm import load

    model = load(str(chat_model))
    prompt = "Once upon a time"
    ranked = np.argsort(-model.logits(model.encode_prompt(prompt))[-1])
    def first_token(**bias) -> bytes:
        answer = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=1, logprobs=0, **bias)
        return answer.choices[0].logprobs.tokens[0].encode()
    best, second = (model.tokenizer.token_bytes(int(t)).decode("utf-8", "replace").encode() for t in ranked[:2])
    assert first_token() == best
    assert first_token(logit_bias={str(ranked[0]): -100}) == second
    forced = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=4,
                                       logit_bias={str(ranked[7]): 100})
    assert forced.choices[0].text == model.detokenize([int(ranked[7])] * 4)  # through the runner's batch
    alone = model.stream(model.encode_prompt(prompt), Options(temperature=0, repeat_penalty=1.0, num_predict=4,
                                                              logit_bias={int(ranked[7]): 100.0}))
    assert "".join(item for item in alone if isinstance(item, str)) == forced.choices[0].text  # the lone loop


@pytest.mark.parametrize("bias, words", [([1], "must be an object"), ({"x": 1}, "'x' is not a token id"),
                                         ({"3": 101}, "from -100 to 100"), ({"99999999": 1}, "outside the vocabulary")])
def test_a_bad_logit_bias_is_a_400_naming_it(client, bias, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=HELLO, max_tokens=2, logit_bias=bias)
    assert caught.value.param == "logit_bias" and words in caught.value.message


def test_chat_logprobs_are_the_models_and_greedy_takes_the_best(client, chat_model):
    answer = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=8, logprobs=True,
                                            top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].bytes == entry.bytes and entry.top_logprobs[0].logprob == entry.logprob

    # The first token's against the model's logits for the rendered prompt, computed in this process.
    from mlxrunner import store
    from mlxrunner.llm.model import LanguageModel

    model = LanguageModel(store.resolve(str(chat_model)))
    logits = model.logits(model.tokenize(ChatTemplate.from_folder(chat_model).render(HELLO)))[-1].astype(np.float64)
    expected = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    best = np.argsort(-expected)[:3]
    assert [bytes(t.bytes) for t in entries[0].top_logprobs] == [model.tokenizer.token_bytes(int(i)) for i in best]
    assert np.allclose([t.logprob for t in entries[0].top_logprobs], expected[best], atol=1e-4)

    streamed = list(client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=8,
                                                   logprobs=True, top_logprobs=3, stream=True))
    streamed_entries = [e for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed_entries] == [(e.token, round(e.logprob, 4))
                                                                          for e in entries]


def test_completions_logprobs_in_the_legacy_form(client):
    answer = client.completions.create(model="m", prompt="Once upon a time", temperature=0, max_tokens=6, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(len(top) <= 2 and max(top.values()) == lp for top, lp in zip(logprobs.top_logprobs,
                                                                             logprobs.token_logprobs))
    assert logprobs.text_offset[0] == 0


def test_text_parts_join_with_newlines(client, chat_model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    a = client.chat.completions.create(model="m", messages=parts, temperature=0, max_tokens=6)
    b = client.chat.completions.create(model="m", messages=joined, temperature=0, max_tokens=6)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_unknown_v1_route_is_an_openai_404(runner):
    request = urllib.request.Request(f"http://{runner.host}:{runner.port}/v1/nothing", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 404
    assert set(json.loads(caught.value.read())["error"]) == {"message", "type", "param", "code"}


def test_image_route_on_an_llm_is_a_400_naming_the_chat_route(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a cat")
    assert "/v1/chat/completions" in caught.value.message


def test_a_model_without_a_chat_template_refuses_chat_but_completes():
    with Runner.start(str(QWEN3), timeout=120) as runner:
        client = openai.OpenAI(base_url=f"http://{runner.host}:{runner.port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="m", messages=HELLO)
        assert "no chat template" in caught.value.message and caught.value.param == "messages"
        assert client.completions.create(model="m", prompt="Hi", max_tokens=2).choices[0].finish_reason


CHAT_GOLDENS = json.loads((Path(__file__).parents[1] / "goldens" / "chat_generate.json").read_text())


@pytest.mark.parametrize("case", sorted(CHAT_GOLDENS["cases"]))
def test_chat_greedy_equals_transformers_generate(client, case):
    """The whole chat path (template, end-of-turn ids, decode loop, detokenizer) against transformers'
    apply_chat_template + greedy generate on the same model (scripts/goldens_chat_generate.py)."""
    golden = CHAT_GOLDENS["cases"][case]
    reply = client.chat.completions.create(model="m", messages=golden["messages"], temperature=0,
                                           max_tokens=CHAT_GOLDENS["max_new_tokens"])
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(golden["prompt_ids"])
    assert reply.usage.completion_tokens == len(golden["ids"])
    assert choice.message.content == golden["text"]
    assert choice.finish_reason == golden["finish_reason"]
