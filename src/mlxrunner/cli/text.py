"""LLMs in the terminal, what `generate` and `chat` share: the sampling and thinking flags, a reply streamed to
stdout as it is generated, Ctrl-C that stops a reply, and the stats line.

A reply made through the chat template is split as the OpenAI chat route splits it (text/tool_calls.py's
OutputParser, no tools): `<think>` reasoning is printed between "Thinking..." and "...done thinking." (dim on a
terminal), or not at all with --hide-thinking, and only the content is the reply. A raw prompt's text is
printed as generated.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Collection, TextIO

from mlxrunner.errors import Cancelled, RequestError
from mlxrunner.request import Limits, Options, parse_options
from mlxrunner.settings import GIB
from mlxrunner.text.json_schema import CompiledSchema, SchemaError, compile_schema
from mlxrunner.text.tool_calls import ContentDelta, Event, OutputParser, ReasoningDelta, prompt_ends_in_reasoning

if TYPE_CHECKING:
    from mlxrunner.llm.answer import Completion
    from mlxrunner.models import TextModel

# flag (its argparse dest) -> the /completion option it sets; each default is the option's own.
SAMPLING_FLAGS = {"max_tokens": "num_predict", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "min_p": "min_p", "repeat_penalty": "repeat_penalty", "seed": "seed"}
THINKING_FLAGS = ("no_think", "hide_thinking")
THINKING_START, THINKING_END = "Thinking...\n", "\n...done thinking.\n\n"
DIM, PLAIN = "\x1b[2m", "\x1b[0m"


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--max-tokens/-n, --temperature, --top-k, --top-p, --min-p, --repeat-penalty: a /completion request's
    options, with its defaults (Ollama's; docs/protocol.md). Greedy is --temperature 0 --repeat-penalty 1.
    Each command adds --seed itself (generate's seeds images too)."""
    group = parser.add_argument_group("sampling (LLMs; unset = the runner's default, as for /completion)")
    group.add_argument("--max-tokens", "-n", type=int, metavar="N",
                       help="most tokens to generate (default: until the model stops or its context is full)")
    group.add_argument("--temperature", type=float, metavar="T", help="0 is greedy")
    group.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens; 0 is off")
    group.add_argument("--top-p", type=float, metavar="P", help="keep the tokens within probability mass P; 1 is off")
    group.add_argument("--min-p", type=float, metavar="P", help="drop tokens less likely than P times the best")
    group.add_argument("--repeat-penalty", type=float, metavar="R", help="penalise recent tokens; 1 is off")


def add_thinking_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("thinking (models whose chat template has it, such as Qwen3)")
    group.add_argument("--no-think", action="store_true", default=None,
                       help="ask the model not to think (the template's enable_thinking=false)")
    group.add_argument("--hide-thinking", action="store_true", default=None, help="do not print the reasoning")


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    """The sampling flags as /completion options, checked against the same bounds (usage error, exit 2)."""
    given = {option: getattr(args, flag) for flag, option in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    try:
        return parse_options(given, Limits())
    except RequestError as exc:
        flag = next(f for f, option in SAMPLING_FLAGS.items() if exc.field == f"options.{option}")
        parser.error(f"argument --{flag.replace('_', '-')}: {exc}")


def json_schema_from(value: str | None, parser: argparse.ArgumentParser) -> CompiledSchema | None:
    """--format: None for "json" (any object) or no flag, else the compiled schema of the file it names (usage
    error, exit 2, when the file is missing, is not JSON, or holds a schema the answer cannot be held to)."""
    if value is None or value == "json":
        return None
    try:
        return compile_schema(json.loads(Path(value).read_text()))
    except OSError as exc:
        parser.error(f"argument --format: {value}: {exc.strerror or exc}")
    except json.JSONDecodeError as exc:
        parser.error(f"argument --format: {value} is not JSON: {exc}")
    except SchemaError as exc:
        parser.error(f"argument --format: {exc}")


def template_kwargs(args: argparse.Namespace) -> dict:
    """Extra variables for the chat template, as an OpenAI request's chat_template_kwargs."""
    return {"enable_thinking": False} if args.no_think else {}


@dataclass
class Reply:
    """One generated answer: its content and reasoning, and the Completion (None when it was stopped)."""

    content: str = ""
    reasoning: str = ""
    completion: Completion | None = None

    def as_message(self) -> dict:
        """The reply as the assistant's turn of a conversation (OpenAI's form, as clients send it back)."""
        message = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        return message


class ReplyWriter:
    """Prints a reply's events as they come: the content as it is, the reasoning framed (or hidden)."""

    def __init__(self, out: TextIO, show_thinking: bool = True):
        self.out = out
        self.show_thinking = show_thinking
        self.styled = out.isatty()  # ANSI dim for the reasoning on a terminal only
        self._thinking = False

    def write(self, event: Event) -> None:
        if isinstance(event, ReasoningDelta):
            if not self.show_thinking:
                return
            if not self._thinking:
                self._thinking = True
                self._write((DIM if self.styled else "") + THINKING_START)
            self._write(event.text)
        else:
            self._end_thinking()
            self._write(event.text)

    def finish(self) -> None:
        self._end_thinking()

    def _end_thinking(self) -> None:
        if self._thinking:
            self._thinking = False
            self._write(THINKING_END + (PLAIN if self.styled else ""))

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


class StopOnCtrlC:
    """While active, Ctrl-C (SIGINT) stops the reply at its next token instead of raising KeyboardInterrupt
    wherever the interpreter happens to be (inside the printer, halfway through a history update).

    `check_cancelled` is what LanguageModel.stream calls between tokens.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def check_cancelled(self) -> None:
        if self.pressed:
            raise Cancelled("stopped by Ctrl-C")

    def __enter__(self) -> StopOnCtrlC:
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.pressed = True


def stream_reply(model: TextModel, prompt: str | list[int], options: Options, writer: ReplyWriter, *,
                 parser: OutputParser | None = None, stop_token_ids: Collection[int] = (),
                 stop: StopOnCtrlC | None = None, json_output: bool = False,
                 json_schema: CompiledSchema | None = None) -> Reply:
    """Generate and print one reply. `parser` splits out reasoning (None: the text is all content). A reply
    stopped by `stop` keeps what was generated so far, with no Completion. json_output / json_schema: held to one
    JSON object (LanguageModel.stream)."""
    reply = Reply()

    def take(events: list[Event]) -> None:
        for event in events:
            if isinstance(event, ReasoningDelta):
                reply.reasoning += event.text
            else:
                reply.content += event.text
            writer.write(event)

    try:
        for item in model.stream(prompt, options, stop.check_cancelled if stop else None,
                                 stop_token_ids=stop_token_ids, json_output=json_output, json_schema=json_schema):
            if isinstance(item, str):
                take(parser.feed(item) if parser else [ContentDelta(item)])
            else:
                reply.completion = item
    except Cancelled:
        pass
    if parser:
        take(parser.finish())
    writer.finish()
    return reply


def templated_prompt(model: TextModel, messages: list[dict], kwargs: dict) -> tuple[list[int], OutputParser]:
    """The conversation rendered by the model's chat template, as token ids (the template wrote every special
    token), and the parser for the reply: what the OpenAI chat route does."""
    rendered = model.chat_template.render(messages, **kwargs)
    return model.tokenize(rendered), OutputParser(tool_calls=False,
                                                  starts_in_reasoning=prompt_ends_in_reasoning(rendered))


def stats_line(completion: Completion) -> str:
    """Prompt and generation tokens with their speed, and MLX's peak memory (what mlx_lm.generate prints)."""
    import mlx.core as mx

    def rate(tokens: int, ns: int) -> str:
        return f"{tokens / ns * 1e9:.1f}" if ns > 0 else "-"

    return (f"prompt: {completion.prompt_eval_count} tokens, "
            f"{rate(completion.prompt_eval_count, completion.prompt_eval_duration)} tokens/s | "
            f"generation: {completion.eval_count} tokens, "
            f"{rate(completion.eval_count, completion.eval_duration)} tokens/s | "
            f"peak memory: {mx.get_peak_memory() / GIB:.3f} GB")


def print_stats(completion: Completion) -> None:
    print(stats_line(completion), file=sys.stderr, flush=True)
