"""Golden prompts for mlxrunner.text.chat_template: transformers' own `apply_chat_template` output.

Every conversation below is rendered with `AutoTokenizer.from_pretrained(folder).apply_chat_template(...,
tokenize=False)` for each tokenizer folder in tests/fixtures/chat/ (see the README there), and written with
its inputs to tests/goldens/chat_templates.json. tests/unit/test_chat_template.py renders the same inputs with
mlxrunner and compares the strings exactly, without transformers.

The conversations are in OpenAI's chat form, as the chat route receives them. transformers takes them after
the normalisation that servers do (mlx-lm, vLLM), written out here independently of mlxrunner: text parts
joined with "\\n" and tool-call arguments decoded from their JSON string. A case whose template raises records
the error message instead of a prompt.

Usage, from the repository root, in the side venv (`python3 -m venv .goldens && .goldens/bin/pip install
transformers jinja2`; no torch needed):

    .goldens/bin/python scripts/goldens_chat_templates.py
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the model hub: the folders are local

import jinja2
import transformers
from transformers import AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
FOLDERS_DIR = REPO_ROOT / "tests" / "fixtures" / "chat"
FOLDERS = ["qwen3", "llama3.1", "llama3-named"]
OUTPUT = REPO_ROOT / "tests" / "goldens" / "chat_templates.json"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now, in a time zone.",
                                              "parameters": {"type": "object",
                                                             "properties": {"zone": {"type": "string"}}}}}


def tool_call(call_id: str, name: str, arguments: dict) -> dict:
    """An assistant tool call in OpenAI form: arguments as a JSON string."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


SYSTEM_USER = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
MULTI_TURN = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello! How can I help?"},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "7", "reasoning_content": "Any prime will do."},
    {"role": "user", "content": "Another one, please."},
]
TOOL_CALL_AND_RESULT = [
    {"role": "user", "content": "What's the weather in Zürich?"},
    {"role": "assistant", "content": None, "reasoning": "The user wants the weather: call the tool.",
     "tool_calls": [tool_call("call_1", "get_weather", {"city": "Zürich", "unit": "celsius"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"<clear> & calm\"}"},
]
TWO_TOOL_CALLS = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Oslo, and the time there?"},
    {"role": "assistant", "content": "Checking both.",
     "tool_calls": [tool_call("call_a", "get_weather", {"city": "Oslo"}),
                    tool_call("call_b", "get_time", {"zone": "Europe/Oslo"})]},
    {"role": "tool", "tool_call_id": "call_a", "content": "rain, 9 C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
]
TEXT_PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "You are a concise assistant."}]},
    {"role": "user", "content": [{"type": "text", "text": "Translate to German:"},
                                 {"type": "text", "text": "Good morning"}]},
]

# (name, messages, tools, [(add_generation_prompt, template kwargs), ...])
CASES: list[tuple[str, list[dict], list[dict] | None, list[tuple[bool, dict]]]] = [
    ("system_user", SYSTEM_USER, None, [(True, {}), (False, {}), (True, {"enable_thinking": False}),
                                        (True, {"enable_thinking": True})]),
    ("multi_turn", MULTI_TURN, None, [(True, {}), (True, {"enable_thinking": False})]),
    ("tool_call_and_result", TOOL_CALL_AND_RESULT, [WEATHER_TOOL], [(True, {}), (True, {"date_string": "1 Dec 2026"})]),
    ("two_tool_calls", TWO_TOOL_CALLS, [WEATHER_TOOL, TIME_TOOL], [(True, {})]),
    ("tools_no_call", SYSTEM_USER, [WEATHER_TOOL], [(True, {}), (True, {"tools_in_user_message": False})]),
    ("empty_tools", SYSTEM_USER, [], [(True, {})]),
    ("text_parts", TEXT_PARTS, None, [(True, {}), (False, {})]),
]


def as_transformers_input(messages: list[dict]) -> list[dict]:
    """What a server hands transformers: text parts joined with "\\n", tool-call arguments decoded."""
    out = copy.deepcopy(messages)
    for message in out:
        if isinstance(message.get("content"), list):
            message["content"] = "\n".join(part["text"] for part in message["content"])
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


def render(tokenizer: Any, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
           kwargs: dict) -> dict:
    try:
        prompt = tokenizer.apply_chat_template(as_transformers_input(messages), tools=tools, tokenize=False,
                                               add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as exc:
        return {"error": str(exc)}
    return {"prompt": prompt}


def main() -> None:
    cases = []
    for folder in FOLDERS:
        tokenizer = AutoTokenizer.from_pretrained(FOLDERS_DIR / folder)
        for name, messages, tools, variants in CASES:
            for add_generation_prompt, kwargs in variants:
                cases.append({"folder": folder, "name": name, "messages": messages, "tools": tools,
                              "add_generation_prompt": add_generation_prompt, "kwargs": kwargs,
                              **render(tokenizer, messages, tools, add_generation_prompt, kwargs)})
    golden = {"generator": "scripts/goldens_chat_templates.py", "transformers": transformers.__version__,
              "jinja2": jinja2.__version__, "cases": cases}
    OUTPUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    errors = sum("error" in case for case in cases)
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}: {len(cases)} cases ({errors} template errors)")


if __name__ == "__main__":
    main()
