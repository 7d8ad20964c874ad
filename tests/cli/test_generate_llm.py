"""`mlxrunner generate` with an LLM: the answer streamed to stdout, the speed on stderr.

Each run is compared with the same model's greedy output in process, through the same chat template (or the
raw prompt), which is the parity-checked decoder; the model is random, so the text itself means nothing.
"""

from __future__ import annotations

import json
import re

import pytest
from cli_helpers import GREEDY, QWEN3, SHORT_PROMPT, greedy_reply
from conftest import chat_model_folder, run_cli

from mlxrunner import _core
from mlxrunner.llm import load
from mlxrunner.request import Options

STATS = re.compile(r"^prompt: (\d+) tokens, [\d.]+ tokens/s \| generation: (\d+) tokens, [\d.]+ tokens/s \| "
                   r"peak memory: \d+\.\d{3} GB$")
TOKENS = 24


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return chat_model_folder(tmp_path_factory.mktemp("qwen3-chat"))


@pytest.fixture(scope="module")
def chat_model(chat_folder):
    return load(str(chat_folder))


def generate(folder, *args: str, stdin: str | None = None):
    result = run_cli("generate", "--model", str(folder), *GREEDY, "-n", str(TOKENS), *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result


def stats(stderr: str) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of the stats line, which is stderr's last."""
    match = STATS.match(stderr.strip().splitlines()[-1])
    assert match, stderr
    return int(match[1]), int(match[2])


def test_the_answer_is_the_greedy_reply_through_the_chat_template(chat_folder, chat_model):
    expected, completion = greedy_reply(chat_model, [{"role": "user", "content": SHORT_PROMPT}], TOKENS)
    assert expected.content and not expected.reasoning_content  # what this random model does
    result = generate(chat_folder, SHORT_PROMPT)
    assert result.stdout == expected.content + "\n"
    assert stats(result.stderr) == (completion.prompt_eval_count, completion.eval_count)
    assert "loading" in result.stderr  # the progress bar


def test_the_prompt_from_stdin_and_from_dash_is_the_same_prompt(chat_folder, chat_model):
    expected, _ = greedy_reply(chat_model, [{"role": "user", "content": SHORT_PROMPT}], TOKENS)
    assert generate(chat_folder, stdin=SHORT_PROMPT + "\n").stdout == expected.content + "\n"
    assert generate(chat_folder, "-", stdin=SHORT_PROMPT).stdout == expected.content + "\n"


def test_system_prompt_and_no_think_reach_the_template(chat_folder, chat_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SHORT_PROMPT}]
    expected, _ = greedy_reply(chat_model, messages, TOKENS, enable_thinking=False)
    plain, _ = greedy_reply(chat_model, [{"role": "user", "content": SHORT_PROMPT}], TOKENS)
    assert expected.content != plain.content  # else this test could not tell
    result = generate(chat_folder, "--system", "Be brief.", "--no-think", "-p", SHORT_PROMPT)
    assert result.stdout == expected.content + "\n"


def test_raw_sends_the_prompt_as_it_is(chat_folder, chat_model):
    options = Options(temperature=0.0, repeat_penalty=1.0, num_predict=TOKENS)
    *chunks, completion = chat_model.stream("hello world", options)  # the tokenizer's BOS, as /completion
    result = generate(chat_folder, "--raw", "hello world")
    assert result.stdout == "".join(chunks) + "\n"
    assert stats(result.stderr) == (completion.prompt_eval_count, completion.eval_count)
    refused = run_cli("generate", "--model", str(chat_folder), "--raw", "--system", "Be brief.", "--no-think", "x")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == ("Error: --system and --no-think need the chat template: "
                                                       "leave out --raw")


def test_a_model_without_a_chat_template_gets_the_raw_prompt(chat_model):
    base = load(str(QWEN3))
    *chunks, _ = base.stream("hello world", Options(temperature=0.0, repeat_penalty=1.0, num_predict=TOKENS))
    assert generate(QWEN3, "hello world").stdout == "".join(chunks) + "\n"
    refused = run_cli("generate", "--model", str(QWEN3), "--system", "Be brief.", "hello world")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == f"Error: --system needs the chat template: {QWEN3} has none"


@pytest.mark.parametrize("flag, message", [
    (("--temperature", "101"), 'argument --temperature: field "options.temperature" must be between 0 and 100, '
                               "got 101"),
    (("--top-k", "many"), "argument --top-k: invalid int value: 'many'"),
])
def test_a_bad_sampling_flag_is_a_usage_error(flag, message):
    result = run_cli("generate", "--model", str(QWEN3), "x", *flag)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"mlxrunner generate: error: {message}"


def test_format_json_holds_the_answer_to_an_object(chat_folder, chat_model, tmp_path):
    result = generate(chat_folder, "--format", "json", SHORT_PROMPT)
    answer = result.stdout.rstrip("\n")
    assert answer.startswith("{") and _core.JsonGrammar().feed(answer.encode())
    schema = {"type": "object", "additionalProperties": False, "required": ["ok"],
              "properties": {"ok": {"type": "boolean"}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = run_cli("generate", "--model", str(chat_folder), *GREEDY, "-n", "200", "--format",
                     str(tmp_path / "schema.json"), SHORT_PROMPT)
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout)["ok"], bool)


@pytest.mark.parametrize("schema, message", [(None, "No such file"), ("{", "is not JSON"),
                                             ('{"type": "array"}', "root must be an object")])
def test_a_format_that_cannot_be_used_is_a_usage_error(chat_folder, tmp_path, schema, message):
    path = tmp_path / "schema.json"
    if schema is not None:
        path.write_text(schema)
    result = run_cli("generate", "--model", str(chat_folder), "--format", str(path), SHORT_PROMPT)
    assert result.returncode == 2 and "--format" in result.stderr and message in result.stderr
