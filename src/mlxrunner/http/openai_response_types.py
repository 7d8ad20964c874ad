"""OpenAI's Responses API on the wire (POST /v1/responses): the request read into a chat, and the answer's output
items, response object and stream events.

A request's `input` is a string or a list of items: messages, the model's earlier reasoning and function calls,
and function call outputs. They become chat messages for the model's chat template (`Conversation`): an assistant's
turn, several items in the Responses API (its reasoning, its text, each function call), is one chat message, as
chat templates expect. Function tools, `tool_choice` and `text.format` map onto what the chat route already does
(openai_types.py: the tools reach the template, a forced call or a JSON answer is held to its schema), and every
error names the Responses API's field, not the chat route's (the chat code is told the name: `text.format`,
`input`). The contract is docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlxrunner.errors import RequestError
from mlxrunner.http.openai_types import (
    ChatRequest,
    StreamOptions,
    call_schema,
    chat_logprobs,
    now,
    parse_response_format,
    parse_sampling,
    parse_tool_choice,
)
from mlxrunner.request import Limits, bool_field, int_field, json_type, str_field
from mlxrunner.request import checked_text as _checked_text

if TYPE_CHECKING:
    from mlxrunner.llm.answer import TokenLogprob
    from mlxrunner.text.tool_calls import ToolCall

# Content parts whose text a message carries. Earlier answers come back as output_text (or refusal) parts.
TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}
NOT_TEXT_PARTS = ("input_image", "input_file", "input_audio")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def checked_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f'field "{name}" must be a string, got {json_type(value)}', field=name)
    return _checked_text(value, name)


# --- input items -> chat messages --------------------------------------------------------------------------------


def parts_text(content: Any, where: str) -> str:
    """A message's content, a string or text parts, as one text (parts joined by a newline, as chat's are)."""
    if isinstance(content, str):
        return checked_text(content, where)
    if not isinstance(content, list):
        raise RequestError(f'field "{where}" must be a string or an array of content parts, got {json_type(content)}',
                           field=where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in NOT_TEXT_PARTS:
            raise RequestError(f'field "{at}": this runner\'s language models read text only, not {kind}', field=at)
        if not isinstance(kind, str) or kind not in TEXT_PARTS:
            raise RequestError(f'field "{at}" must be a text part ({", ".join(sorted(TEXT_PARTS))}), got '
                               f"{kind!r}" if kind is not None else f'field "{at}" must be an object with a "type"',
                               field=at)
        texts.append(checked_text(part.get(TEXT_PARTS[kind]), f"{at}.{TEXT_PARTS[kind]}"))
    return "\n".join(texts)


class Conversation:
    """Chat messages made of Responses items, in order."""

    def __init__(self, messages: list[dict] | None = None):
        self.messages: list[dict] = list(messages or [])

    def add_items(self, items: Any) -> None:
        """`input`: a string (one user message) or a list of items."""
        if isinstance(items, str):
            self.messages.append({"role": "user", "content": checked_text(items, "input")})
            return
        if not isinstance(items, list) or not items:
            raise RequestError('field "input" must be a string or a non-empty array of items, got '
                               f"{json_type(items) if not isinstance(items, list) else 'an empty array'}",
                               field="input")
        for i, item in enumerate(items):
            self.add_item(item, f"input[{i}]")

    def add_item(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            raise RequestError(f'field "{where}" must be an item object, got {json_type(item)}', field=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise RequestError(f'field "{where}.role" must be one of {", ".join(ROLES)}, got {role!r}',
                                   field=f"{where}.role")
            self.add_message(ROLES[role], parts_text(item.get("content"), f"{where}.content"))
        elif kind == "function_call":
            self.add_call(checked_text(item.get("call_id"), f"{where}.call_id"),
                          checked_text(item.get("name"), f"{where}.name"),
                          checked_text(item.get("arguments"), f"{where}.arguments"))
        elif kind == "function_call_output":
            self.messages.append({"role": "tool", "tool_call_id": checked_text(item.get("call_id"), f"{where}.call_id"),
                                  "content": parts_text(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            text = reasoning_text(item, where)
            if text:  # a reasoning item may carry only encrypted_content: nothing a template can show
                self.add_reasoning(text)
        elif kind == "item_reference":
            raise RequestError(f'field "{where}": item references are not supported; send the item itself, or the '
                               "response it belongs to as previous_response_id", field=where)
        else:
            raise RequestError(f'field "{where}.type" must be message, function_call, function_call_output or '
                               f"reasoning (the items a chat is made of), got {kind!r}", field=f"{where}.type")

    def _turn(self) -> dict | None:
        """The assistant message being written, if the last message is one."""
        last = self.messages[-1] if self.messages else None
        return last if last is not None and last["role"] == "assistant" else None

    def add_message(self, role: str, text: str) -> None:
        turn = self._turn()
        if role == "assistant" and turn is not None and not turn["content"] and "tool_calls" not in turn:
            turn["content"] = text  # the text after its reasoning
        else:
            self.messages.append({"role": role, "content": text})

    def add_call(self, call_id: str, name: str, arguments: str) -> None:
        turn = self._turn()
        if turn is None:
            self.messages.append(turn := {"role": "assistant", "content": ""})
        turn.setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})

    def add_reasoning(self, text: str) -> None:
        turn = self._turn()
        if turn is not None and not turn["content"] and "tool_calls" not in turn and "reasoning_content" not in turn:
            turn["reasoning_content"] = text
        else:
            self.messages.append({"role": "assistant", "content": "", "reasoning_content": text})

    def add_output(self, items: list[dict]) -> None:
        """A response's own output items, as the next request's history."""
        for item in items:
            self.add_item(item, "output")


def reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's text: its reasoning_text content, else its summary."""
    for key, part_type in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list) or not all(isinstance(p, dict) and p.get("type") == part_type for p in parts):
            raise RequestError(f'field "{where}.{key}" must be an array of {part_type} parts', field=f"{where}.{key}")
        if parts:
            return "".join(checked_text(p.get("text"), f"{where}.{key}.text") for p in parts)
    return ""


# --- the request ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponsesRequest:
    chat: ChatRequest  # its messages: the instructions (a system message), then `conversation`
    conversation: list[dict]  # the earlier responses' conversation (previous_response_id), then this input
    input_items: list[dict]  # this request's input as items (a string input is one user message)
    instructions: str | None
    previous_response_id: str | None
    store: bool
    stream: bool
    echo: dict  # the request's settings as the response object repeats them


def function_tools(value: Any) -> list[dict] | None:
    """The Responses API's function tools ({"type": "function", "name", "parameters", ...}) in the chat form the
    templates read ({"type": "function", "function": {...}})."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestError(f'field "tools" must be an array of tools, got {json_type(value)}', field="tools")
    tools = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else json_type(tool)
            raise RequestError(f'field "{where}": this runner calls function tools only, got {kind!r}', field=where)
        function = {"name": checked_text(tool.get("name"), f"{where}.name")}
        if tool.get("description") is not None:
            function["description"] = checked_text(tool.get("description"), f"{where}.description")
        if tool.get("parameters") is not None:
            if not isinstance(tool["parameters"], dict):
                raise RequestError(f'field "{where}.parameters" must be a JSON schema object',
                                   field=f"{where}.parameters")
            function["parameters"] = tool["parameters"]
        tools.append({"type": "function", "function": function})
    return tools


def chat_tool_choice(value: Any) -> Any:
    """`tool_choice` in the chat form: the strings are the same, {"type": "function", "name"} nests its name."""
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise RequestError('field "tool_choice" must be "auto", "none", "required" or {"type": "function", "name": ...}',
                       field="tool_choice")


def chat_response_format(text: Any) -> Any:
    """`text.format` in the chat route's response_format form."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise RequestError(f'field "text" must be an object, got {json_type(text)}', field="text")
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise RequestError('field "text.format": "json_schema" needs {"type": "json_schema", "name": ..., '
                               '"schema": {...}}', field="text.format")
        return {"type": "json_schema", "json_schema": {k: fmt.get(k) for k in ("name", "schema", "strict")}}
    return fmt


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def reasoning_effort(value: Any) -> str | None:
    """`reasoning.effort`, checked; None when not given."""
    if value is None:
        return None
    effort = value.get("effort") if isinstance(value, dict) else value
    if not isinstance(value, dict) or effort is not None and effort not in REASONING_EFFORTS:
        raise RequestError(f'field "reasoning.effort" must be one of {", ".join(REASONING_EFFORTS)}, got '
                           f"{effort if isinstance(value, dict) else json_type(value)!r}", field="reasoning.effort")
    return effort


def effort_template_kwargs(effort: str | None) -> dict:
    """What a reasoning effort tells the chat template: `reasoning_effort` for the templates that read it (GPT-OSS's),
    and for "none" `enable_thinking: false` (Qwen3's switch); a template ignores variables it does not read."""
    if effort is None:
        return {}
    return {"reasoning_effort": effort, **({"enable_thinking": False} if effort == "none" else {})}


def parse_responses(body: dict, limits: Limits, history: list[dict] = ()) -> ResponsesRequest:
    """history: the conversation previous_response_id names (chat messages; this request's input follows it)."""
    if body.get("background"):
        raise RequestError('field "background": this runner answers while the client waits; send false',
                           field="background")
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
        raise RequestError('field "include" must be an array of strings', field="include")
    conversation = Conversation(history)
    conversation.add_items(body.get("input"))
    tools = function_tools(body.get("tools"))
    forced_tools = parse_tool_choice(chat_tool_choice(body.get("tool_choice")), tools)
    json_output, json_schema = parse_response_format(chat_response_format(body.get("text")), field="text.format")
    max_tokens = int_field(body, "max_output_tokens", 1, limits.max_num_predict)
    # Checked above, so the chat route's own reading of it cannot fail under its name.
    options = parse_sampling({**body, "max_tokens": None, "max_completion_tokens": max_tokens}, limits)
    if body.get("tool_choice") == "none" or not tools:
        tools = None
    if forced_tools is not None:
        if json_output:
            raise RequestError('fields "tool_choice" and "text.format" both say what the answer is: the first asks '
                               "for a function call, the second for JSON text; send one", field="tool_choice")
        json_output, json_schema = True, call_schema(forced_tools)
    top_logprobs = int_field(body, "top_logprobs", 0, 20)
    logprobs = (top_logprobs or 0) if LOGPROBS_INCLUDE in include or top_logprobs is not None else None
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise RequestError('field "chat_template_kwargs" must be an object', field="chat_template_kwargs")
    effort = reasoning_effort(body.get("reasoning"))
    template_kwargs = {**effort_template_kwargs(effort), **template_kwargs}  # what the request's kwargs say wins
    stream = bool(bool_field(body, "stream", False))
    instructions = body.get("instructions")
    if instructions is not None:
        instructions = checked_text(instructions, "instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    chat = ChatRequest(messages=system + conversation.messages, tools=tools, options=options,
                       stream=StreamOptions(stream), logprobs=logprobs, template_kwargs=template_kwargs,
                       model=str_field(body, "model"), json_output=json_output, json_schema=json_schema,
                       forced_tools=forced_tools)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise RequestError(f'field "metadata" must be an object, got {json_type(metadata)}', field="metadata")
    echo = {"max_output_tokens": max_tokens, "temperature": options.temperature, "top_p": options.top_p,
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "text": body.get("text") or {"format": {"type": "text"}}, "top_logprobs": top_logprobs or 0,
            "parallel_tool_calls": bool_field(body, "parallel_tool_calls", True), "metadata": metadata or {},
            "user": body.get("user"), "truncation": "disabled", "reasoning": {"effort": effort, "summary": None}}
    return ResponsesRequest(chat=chat, conversation=conversation.messages, input_items=input_items(body["input"]),
                            instructions=instructions,
                            previous_response_id=str_field(body, "previous_response_id"),
                            store=bool(bool_field(body, "store", True)), stream=stream, echo=echo)


def input_items(value: str | list[dict]) -> list[dict]:
    """A (checked) `input` as the items GET /v1/responses/{id}/input_items lists: a string is one user message, and
    a message's string content one text part, as OpenAI lists them (their ids are given when they are stored)."""
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value
    listed = []
    for item in items:
        item = {"type": "message", **item} if "type" not in item else dict(item)
        if item["type"] == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        listed.append(item)
    return listed


# --- the answer ---------------------------------------------------------------------------------------------------


def output_text_part(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(item_id: str, status: str, text: str | None = None, logprobs: list[dict] | None = None) -> dict:
    content = [] if text is None else [output_text_part(text, logprobs)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, status: str, text: str | None = None) -> dict:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [], "content": content}


def function_call_item(item_id: str, call: ToolCall, status: str, arguments: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if arguments is None else arguments, "status": status}


def token_logprobs(tokens: list[TokenLogprob]) -> list[dict]:
    """An output_text part's `logprobs`: chat's per-token entries."""
    return chat_logprobs(tokens)["content"]


@dataclass(frozen=True)
class ResponseUsage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0  # of input_tokens, how many came from the prompt cache
    reasoning_tokens: int = 0  # of output_tokens, how many the reasoning took

    def to_json(self) -> dict:
        return {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.input_tokens + self.output_tokens}


@dataclass
class ResponseObject:
    """The response as the API returns it, whole or in a stream's lifecycle events."""

    id: str
    model: str
    request: ResponsesRequest
    created_at: int = field(default_factory=now)
    status: str = "in_progress"  # in_progress | completed | incomplete | failed
    output: list[dict] = field(default_factory=list)
    usage: ResponseUsage | None = None
    error: dict | None = None  # {"code": "server_error", "message"} once failed
    incomplete_reason: str | None = None  # max_output_tokens

    def to_json(self) -> dict:
        incomplete = {"reason": self.incomplete_reason} if self.incomplete_reason else None
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
                "error": self.error, "incomplete_details": incomplete, "instructions": self.request.instructions,
                "model": self.model, "output": list(self.output),  # as it is now: a stream event is sent later
                "previous_response_id": self.request.previous_response_id, "store": self.request.store,
                "usage": self.usage.to_json() if self.usage else None, **self.request.echo}
