"""A model's output split into what an OpenAI chat response holds: reasoning, content and tool calls.

Qwen-family models think and call tools (Hermes style) like this:

    <think>
    The user wants the weather.
    </think>

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

* `<think>...</think>` is reasoning. When the prompt already opened the block (see `prompt_ends_in_reasoning`),
  the output starts inside it and only `</think>` appears.
* A `<tool_call>` block holding a JSON object with a "name" (and "arguments": an object, or already a JSON
  string) is a tool call; a last block cut off before `</tool_call>` counts too, as in vLLM's Hermes parser.
  A block that does not parse stays in the content, tags and all: nothing is lost and nothing raises.
  Tool calls are looked for only outside reasoning, and only when the request offered tools.
* Whitespace that only separates a tag from the text beside it (the newlines around `</think>`, between
  tool calls) is dropped; all other text is kept exactly as generated.

`OutputParser` does this on a stream: fed the text as it is generated, it returns typed events and holds back
text that might be the start of a tag (`<tool_c`, `</thi`) until the next piece decides it, as the runner's
StopMatcher does for stop strings. `parse_output` is the same parser fed everything at once, so a streamed
and a whole response always agree.
"""

from __future__ import annotations

import enum
import json
import secrets
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def _new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call. Two calls are equal when they call the same function the same way."""

    name: str
    arguments: str  # a JSON object as text: OpenAI's form
    id: str = field(default_factory=_new_call_id, compare=False)

    def to_openai(self) -> dict:
        """The call as an entry of an OpenAI message's `tool_calls` (a streamed chunk also needs an "index")."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


Event = ContentDelta | ReasoningDelta | ToolCall


@dataclass
class ParsedOutput:
    content: str
    reasoning_content: str
    tool_calls: list[ToolCall]


def parse_output(text: str, *, tool_calls: bool = True, starts_in_reasoning: bool = False) -> ParsedOutput:
    """A whole response's text split into content, reasoning and tool calls (see OutputParser for the flags)."""
    parser = OutputParser(tool_calls=tool_calls, starts_in_reasoning=starts_in_reasoning)
    events = parser.feed(text) + parser.finish()
    return ParsedOutput(content="".join(e.text for e in events if isinstance(e, ContentDelta)),
                        reasoning_content="".join(e.text for e in events if isinstance(e, ReasoningDelta)),
                        tool_calls=[e for e in events if isinstance(e, ToolCall)])


def prompt_ends_in_reasoning(prompt: str) -> bool:
    """Whether the rendered prompt leaves a `<think>` block open, so the output starts inside it."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class _Mode(enum.Enum):
    CONTENT = "content"
    REASONING = "reasoning"
    TOOL_CALL = "tool_call"  # inside <tool_call>, collecting the JSON until </tool_call>


class OutputParser:
    """Splits one response's streamed text into content, reasoning and tool-call events.

    tool_calls: look for `<tool_call>` blocks (only when the request offered tools).
    starts_in_reasoning: the prompt opened a `<think>` block (`prompt_ends_in_reasoning(prompt)`).
    """

    def __init__(self, *, tool_calls: bool = True, starts_in_reasoning: bool = False):
        self._content_tags = (THINK_OPEN, CALL_OPEN) if tool_calls else (THINK_OPEN,)
        self._mode = _Mode.REASONING if starts_in_reasoning else _Mode.CONTENT
        self._pending = ""  # received, not yet sent: may still turn out to be (next to) a tag
        self._after_tag = starts_in_reasoning  # leading whitespace of _pending only separates a tag from text
        self._space_before_call = ""  # dropped before <tool_call>; given back if the block is not a call

    def feed(self, text: str) -> list[Event]:
        """Take the next piece of output; return the events it decides, in order."""
        self._pending += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """End of output: send what was held back. A tool call cut off before `</tool_call>` is still parsed."""
        events: list[Event] = []
        if self._mode is _Mode.TOOL_CALL:
            self._end_call(self._pending, events, closed=False)
        else:
            self._send(self._pending, events)
        self._pending = ""
        return events

    def _step(self, events: list[Event]) -> bool:
        """Decide what can be decided at the start of _pending; False once the rest must wait for more text."""
        if self._mode is _Mode.TOOL_CALL:
            end = self._pending.find(CALL_CLOSE)
            if end < 0:
                return False
            body, self._pending = self._pending[:end], self._pending[end + len(CALL_CLOSE):]
            self._end_call(body, events, closed=True)
            return True
        if self._after_tag:
            self._pending = self._pending.lstrip()
            if not self._pending:
                return False
            self._after_tag = False
        tags = self._content_tags if self._mode is _Mode.CONTENT else (THINK_CLOSE,)
        found = _first_tag(self._pending, tags)
        if found is None:
            undecided = _undecided_tail_length(self._pending, tags)
            cut = len(self._pending) - undecided
            self._send(self._pending[:cut], events)
            self._pending = self._pending[cut:]
            return False
        at, tag = found
        before, self._pending = self._pending[:at], self._pending[at + len(tag):]
        text = before.rstrip()
        self._send(text, events)
        if tag == CALL_OPEN:
            self._space_before_call = before[len(text):]
            self._mode = _Mode.TOOL_CALL
        else:
            self._mode = _Mode.REASONING if tag == THINK_OPEN else _Mode.CONTENT
            self._after_tag = True
        return True

    def _end_call(self, body: str, events: list[Event], closed: bool) -> None:
        call = _parse_call(body)
        self._mode = _Mode.CONTENT
        if call is not None:
            events.append(call)
            self._after_tag = True
        else:
            self._send(self._space_before_call + CALL_OPEN + body + (CALL_CLOSE if closed else ""), events)
        self._space_before_call = ""

    def _send(self, text: str, events: list[Event]) -> None:
        if text:
            events.append(ReasoningDelta(text) if self._mode is _Mode.REASONING else ContentDelta(text))


def forced_call_parser() -> OutputParser:
    """The parser of an answer whose prompt ended with `<tool_call>` (a forced call, tool_choice "required"): the
    answer is the call's JSON, which finish() makes a ToolCall of (or content, if it was cut off)."""
    parser = OutputParser(tool_calls=True)
    parser.feed(CALL_OPEN)
    return parser


class PlainOutput:
    """OutputParser's interface for an answer that is all content: one held to JSON, whose strings may hold
    `<think>` or `<tool_call>` as text."""

    def feed(self, text: str) -> list[Event]:
        return [ContentDelta(text)] if text else []

    def finish(self) -> list[Event]:
        return []


def _first_tag(text: str, tags: tuple[str, ...]) -> tuple[int, str] | None:
    """(position, tag) of the earliest tag in text, if any."""
    found = [(text.find(tag), tag) for tag in tags if tag in text]
    return min(found) if found else None


def _undecided_tail_length(text: str, tags: tuple[str, ...]) -> int:
    """Length of the end of text that must wait: the beginning of a tag, and the whitespace before it (which
    is dropped if the tag completes). Whitespace at the very end waits too: a tag may follow it."""
    partial = 0
    for length in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-length:]) for tag in tags):
            partial = length
            break
    rest = text[:len(text) - partial]
    return partial + len(rest) - len(rest.rstrip())


def _parse_call(body: str) -> ToolCall | None:
    """The tool call a `<tool_call>` block holds, or None if it holds none."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str):
        return None
    return ToolCall(data["name"], arguments)
