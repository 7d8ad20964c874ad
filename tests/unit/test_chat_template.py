"""mlxrunner.text.chat_template: loading a model's chat template and rendering it as transformers does.

The goldens (tests/goldens/chat_templates.json, from scripts/goldens_chat_templates.py) are transformers' own
`apply_chat_template` output for the real Qwen3 and Llama 3.1 templates in tests/fixtures/chat/; no
transformers is needed here.
"""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path

import pytest

from mlxrunner.errors import ModelError
from mlxrunner.text.chat_template import (
    ChatTemplate,
    InvalidMessages,
    NoChatTemplate,
    TemplateError,
    normalise_messages,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
CHAT_FOLDERS = FIXTURES / "chat"
GOLDEN_CASES = json.loads((Path(__file__).parent.parent / "goldens" / "chat_templates.json").read_text())["cases"]
USER_HI = [{"role": "user", "content": "Hi"}]


def model_folder(root: Path, **files: str | dict) -> Path:
    """A model folder with the given files (dicts are written as JSON)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = json.dumps(content) if isinstance(content, dict) else content
        (root / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return root


def inline_template(tmp_path: Path, source: str | list[dict], **config: object) -> ChatTemplate:
    return ChatTemplate.from_folder(model_folder(tmp_path, tokenizer_config__json={"chat_template": source, **config}))


# --- transformers' output -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def templates() -> dict[str, ChatTemplate]:
    return {folder.name: ChatTemplate.from_folder(folder) for folder in CHAT_FOLDERS.iterdir() if folder.is_dir()}


@pytest.mark.parametrize("case", GOLDEN_CASES,
                         ids=[f"{c['folder']}-{c['name']}-{i}" for i, c in enumerate(GOLDEN_CASES)])
def test_renders_exactly_as_transformers(templates: dict[str, ChatTemplate], case: dict) -> None:
    template = templates[case["folder"]]
    messages = copy.deepcopy(case["messages"])

    def render() -> str:
        return template.render(messages, tools=case["tools"], add_generation_prompt=case["add_generation_prompt"],
                               **case["kwargs"])

    if "error" in case:
        with pytest.raises(TemplateError) as raised:
            render()
        assert str(raised.value) == case["error"]
    else:
        assert render() == case["prompt"]
    assert messages == case["messages"], "the caller's messages were changed"


def test_goldens_cover_each_fixture_folder() -> None:
    assert {c["folder"] for c in GOLDEN_CASES} == {p.name for p in CHAT_FOLDERS.iterdir() if p.is_dir()}


# --- where the template comes from --------------------------------------------------------------------

def test_a_model_without_a_chat_template_says_so() -> None:
    with pytest.raises(NoChatTemplate, match="no chat template") as raised:
        ChatTemplate.from_folder(FIXTURES / "llm" / "qwen3-tiny")
    assert isinstance(raised.value, ModelError)


def test_chat_template_jinja_takes_precedence_over_tokenizer_config(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, tokenizer_config__json={"chat_template": "from the config"},
                          chat_template__jinja="from the jinja file")
    assert ChatTemplate.from_folder(folder).render(USER_HI) == "from the jinja file"


def test_named_templates_pick_tool_use_when_tools_are_passed(tmp_path: Path) -> None:
    template = inline_template(tmp_path, [{"name": "default", "template": "plain"},
                                          {"name": "tool_use", "template": "tools: {{ tools | length }}"}])
    assert template.render(USER_HI) == "plain"
    assert template.render(USER_HI, tools=[]) == "tools: 0"


def test_named_templates_without_a_default(tmp_path: Path) -> None:
    template = inline_template(tmp_path, [{"name": "tool_use", "template": "tools"}])
    assert template.render(USER_HI, tools=[]) == "tools"
    with pytest.raises(NoChatTemplate, match="no \"default\""):
        template.render(USER_HI)


def test_a_template_that_does_not_compile_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not compile"):
        inline_template(tmp_path, "{% for message in messages %}")


def test_loads_from_a_model_source() -> None:
    from mlxrunner.store import DirectorySource

    template = ChatTemplate.from_folder(DirectorySource("qwen3", CHAT_FOLDERS / "qwen3"))
    assert template.render(USER_HI).endswith("<|im_start|>assistant\n")


def test_special_tokens_as_strings_or_added_token_objects() -> None:
    llama = ChatTemplate.from_folder(CHAT_FOLDERS / "llama3.1")  # bos_token written as an AddedToken object
    assert llama.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    qwen = ChatTemplate.from_folder(CHAT_FOLDERS / "qwen3")  # bos_token and unk_token null
    assert qwen.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_keyword_arguments_override_special_tokens(tmp_path: Path) -> None:
    template = inline_template(tmp_path, "{{ bos_token }}|{{ enable_thinking }}", bos_token="<s>")
    assert template.render(USER_HI) == "<s>|"
    assert template.render(USER_HI, bos_token="", enable_thinking=False) == "|False"


# --- end-of-turn ids ----------------------------------------------------------------------------------

def test_eos_ids_join_config_and_generation_config() -> None:
    assert ChatTemplate.from_folder(CHAT_FOLDERS / "qwen3").eos_token_ids == {502, 500}
    assert ChatTemplate.from_folder(CHAT_FOLDERS / "llama3.1").eos_token_ids == {501, 502}


@pytest.mark.parametrize("config, generation_config, expected", [
    ({"eos_token_id": 7}, None, {7}),
    ({"eos_token_id": [7, 8]}, {"eos_token_id": 9}, {7, 8, 9}),
    ({"eos_token_id": None}, {"eos_token_id": [9, True]}, {9}),
    ({"text_config": {"eos_token_id": [3]}}, None, {3}),
    (None, None, set()),
])
def test_eos_ids_from_ints_lists_and_nulls(tmp_path: Path, config: dict | None, generation_config: dict | None,
                                           expected: set[int]) -> None:
    files = {"tokenizer_config__json": {"chat_template": "x"}}
    if config is not None:
        files["config__json"] = config
    if generation_config is not None:
        files["generation_config__json"] = generation_config
    assert ChatTemplate.from_folder(model_folder(tmp_path, **files)).eos_token_ids == expected


# --- rendering ----------------------------------------------------------------------------------------

def test_raise_exception_carries_the_templates_message(tmp_path: Path) -> None:
    template = inline_template(tmp_path, "{% if messages[0].role != 'system' %}"
                                         "{{ raise_exception('A system message must come first.') }}{% endif %}")
    with pytest.raises(TemplateError) as raised:
        template.render(USER_HI)
    assert str(raised.value) == "A system message must come first."


def test_other_template_failures_are_template_errors(tmp_path: Path) -> None:
    template = inline_template(tmp_path, "{{ messages[0].content + 1 }}")
    with pytest.raises(TemplateError):
        template.render(USER_HI)


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__ }}", "{% set ns = namespace(_hidden=1) %}",
                                    "{% set x = messages.append(1) %}"])
def test_the_sandbox_holds(tmp_path: Path, source: str) -> None:
    with pytest.raises(TemplateError):
        inline_template(tmp_path, source).render(USER_HI)


def test_template_helpers(tmp_path: Path) -> None:
    source = ("{{ strftime_now('%Y') }}|{{ {'b': '<ü>', 'a': 1} | tojson(sort_keys=True, separators=(',', ':')) }}|"
              "{% generation %}body{% endgeneration %}|{% for m in messages %}{% break %}{% endfor %}"
              "{{ dict(a=1) | tojson }}|{% set ns = namespace(n=1) %}{% set ns.n = 2 %}{{ ns.n }}")
    rendered = inline_template(tmp_path, source).render(USER_HI)
    assert rendered == f'{datetime.datetime.now().year}|{{"a":1,"b":"<ü>"}}|body|{{"a": 1}}|2'


def test_trim_and_lstrip_blocks(tmp_path: Path) -> None:
    source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert inline_template(tmp_path, source).render(USER_HI) == "[Hi]\n"


# --- OpenAI messages ----------------------------------------------------------------------------------

def test_text_parts_join_with_newlines() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert normalise_messages(messages) == [{"role": "user", "content": "one\ntwo"}]


@pytest.mark.parametrize("content", [[{"type": "image_url", "image_url": {"url": "x"}}], [{"type": "text"}], ["s"]])
def test_non_text_parts_are_refused(content: list) -> None:
    with pytest.raises(InvalidMessages, match=r"messages\[0\]\.content"):
        normalise_messages([{"role": "user", "content": content}])


@pytest.mark.parametrize("messages", [[], None, ["hello"]])
def test_messages_must_be_a_list_of_objects(messages: object) -> None:
    with pytest.raises(InvalidMessages):
        normalise_messages(messages)


def test_tool_call_arguments_are_decoded_when_they_hold_an_object() -> None:
    def call(arguments: str) -> dict:
        return {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}

    decoded = normalise_messages([call('{"x": [1, "ü"]}'), call("not json"), call("[1, 2]")])
    assert [m["tool_calls"][0]["function"]["arguments"] for m in decoded] == [{"x": [1, "ü"]}, "not json", "[1, 2]"]
    assert all("content" not in m for m in decoded)


def test_null_values_are_dropped_and_tool_results_kept() -> None:
    messages = [{"role": "tool", "tool_call_id": "c1", "content": "21 C", "name": None}]
    assert normalise_messages(messages) == [{"role": "tool", "tool_call_id": "c1", "content": "21 C"}]


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_is_given_under_the_names_templates_read(key: str) -> None:
    (message,) = normalise_messages([{"role": "assistant", "content": "7", key: "primes"}])
    assert message["reasoning_content"] == message["thinking"] == message[key] == "primes"
