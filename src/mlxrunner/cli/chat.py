"""`mlxrunner chat --model LLM`: talk with an LLM in the terminal, as `ollama run` does.

Each message is added to the conversation, which the model's chat template renders whole for every reply (so
the model sees the history); the reply is streamed as `generate` streams it (cli/text.py). At the `>>>` prompt:

    /clear          forget the conversation (the --system prompt stays)
    /bye, Ctrl-D    leave (exit 0)
    /?, /help       these commands
    \"\"\"            begin and end a message of several lines

Ctrl-C during a reply stops it at the next token; what was printed stays in the conversation, as the
assistant's turn, since that is what the person saw. Ctrl-C at the prompt drops the line typed so far; a
second one in a row leaves. Line editing and history come from Python's readline where it exists.
"""

from __future__ import annotations

import argparse
import sys

from mlxrunner import backend
from mlxrunner.cli import text
from mlxrunner.cli.common import add_model_flags, fail, find_model, load_with_bar, settings_from
from mlxrunner.detect import Mode
from mlxrunner.errors import ModelError
from mlxrunner.models import TextModel
from mlxrunner.request import Options

PROMPT, CONTINUATION = ">>> ", "... "
MULTILINE = '"""'
HELP = """Available commands:
  /clear          Forget the conversation (the system prompt stays)
  /bye            Exit (or Ctrl-D)
  /?, /help       Show this help
Use \"\"\" to begin and end a message of several lines.
Ctrl-C stops a reply; at the prompt it drops the line, and a second Ctrl-C exits."""


def chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner chat", allow_abbrev=False,
                                     description="Chat with an LLM in the terminal, through its chat template.",
                                     epilog="At the >>> prompt, /? lists the commands.")
    add_model_flags(parser)
    parser.add_argument("--system", metavar="TEXT", help="system prompt, kept across /clear")
    parser.add_argument("--verbose", action="store_true", help="print each reply's speed and peak memory on stderr")
    text.add_thinking_flags(parser)
    text.add_sampling_flags(parser)
    parser.add_argument("--seed", type=int, help="seed the sampler (default: unseeded)")
    return parser


class Conversation:
    """The messages so far and how the model answers the next one."""

    def __init__(self, model: TextModel, options: Options, system: str | None = None,
                 template_kwargs: dict | None = None):
        self.model = model
        self.options = options
        self.system = [{"role": "system", "content": system}] if system is not None else []
        self.template_kwargs = template_kwargs or {}
        self.messages: list[dict] = []

    def clear(self) -> None:
        self.messages = []

    def answer(self, message: str, writer: text.ReplyWriter, stop: text.StopOnCtrlC | None = None) -> text.Reply:
        """Stream the reply to `message`; both join the conversation (a stopped reply as far as it got).

        A template that refuses the conversation (chat_template's InvalidMessages, NoChatTemplate, TemplateError)
        or a conversation that outgrew the context (llm.model's PromptTooLong) raises and leaves the
        conversation as it was.
        """
        asked = [*self.messages, {"role": "user", "content": message}]
        ids, parser = text.templated_prompt(self.model, self.system + asked, self.template_kwargs)
        reply = text.stream_reply(self.model, ids, self.options, writer, parser=parser,
                                  stop_token_ids=self.model.chat_template.eos_token_ids, stop=stop)
        self.messages = [*asked, reply.as_message()]
        return reply


def main(argv: list[str]) -> int:
    parser = chat_parser()
    args = parser.parse_args(argv)
    options = text.options_from(args, parser)
    settings = settings_from(args, parser)
    try:
        backend.import_mlx()
        from mlxrunner.text.chat_template import ChatTemplate, NoChatTemplate

        source, mode = find_model(settings)
        if mode is not Mode.LLM:
            return fail(f"{settings.model} is an {mode.value} model: chat needs an LLM")
        ChatTemplate.from_folder(source)  # before the weights: a base model cannot chat
        model = load_with_bar(settings).text_model
    except KeyboardInterrupt:
        return fail("interrupted")
    except NoChatTemplate:
        return fail(f"{settings.model} has no chat template (it is a base model, or its chat_template is missing), "
                    "so it cannot chat: use mlxrunner generate --raw for plain prompts")
    except (backend.BackendError, ModelError) as exc:
        return fail(str(exc))
    conversation = Conversation(model, options, args.system, text.template_kwargs(args))
    return repl(conversation, text.ReplyWriter(sys.stdout, show_thinking=not args.hide_thinking), args.verbose)


def repl(conversation: Conversation, writer: text.ReplyWriter, verbose: bool) -> int:
    """Read messages and answer them until /bye, Ctrl-D (end of input) or two Ctrl-C in a row."""
    use_readline()
    interrupted = False  # the last thing typed was a Ctrl-C
    print("Send a message (/? for help)", file=sys.stderr, flush=True)
    while True:
        try:
            message = read_message()
            interrupted = False
            if not handle(message, conversation, writer, verbose):
                return 0
        except EOFError:
            print(flush=True)
            return 0
        except KeyboardInterrupt:  # at the prompt (a reply has StopOnCtrlC), or just before or after one
            if interrupted:
                print(flush=True)
                return 0
            interrupted = True
            print("\nUse Ctrl + d or /bye to exit.", flush=True)


def handle(message: str, conversation: Conversation, writer: text.ReplyWriter, verbose: bool) -> bool:
    """Run a command or answer a message; False for /bye."""
    command = message.strip()
    if command == "/bye":
        return False
    if command.startswith("/"):
        run_command(command, conversation)
    elif command:
        reply_to(conversation, message, writer, verbose)
    return True


def read_message() -> str:
    '''One message from the prompt; a line that starts with """ goes on, over lines, up to the next """.'''
    line = input(PROMPT)
    if not line.startswith(MULTILINE):
        return line
    message = line[len(MULTILINE):]
    while not message.endswith(MULTILINE):
        message += "\n" + input(CONTINUATION)
    return message[: -len(MULTILINE)].strip("\n")


def run_command(command: str, conversation: Conversation) -> None:
    if command == "/clear":
        conversation.clear()
        print("Cleared session context", flush=True)
    elif command in ("/?", "/help"):
        print(HELP, flush=True)
    else:
        print(f"Unknown command '{command.split()[0]}'. Type /? for help", flush=True)


def reply_to(conversation: Conversation, message: str, writer: text.ReplyWriter, verbose: bool) -> None:
    """Answer one message, printing the reply; an error is printed and the chat goes on."""
    from mlxrunner.llm.model import PromptTooLong
    from mlxrunner.text.chat_template import InvalidMessages, NoChatTemplate, TemplateError

    try:
        with text.StopOnCtrlC() as stop:
            reply = conversation.answer(message, writer, stop)
    except PromptTooLong as exc:
        print(f"Error: the conversation no longer fits the model's context ({exc}): /clear to start again",
              file=sys.stderr, flush=True)
        return
    except (InvalidMessages, NoChatTemplate, TemplateError) as exc:
        print(f"Error: the model's chat template refused the conversation: {exc}", file=sys.stderr, flush=True)
        return
    print("\n", flush=True)  # the reply's line ends, then a blank line before the prompt
    if verbose and reply.completion is not None:
        text.print_stats(reply.completion)


def use_readline() -> None:
    """Line editing and in-session history for input(), where Python has readline and stdin is a terminal."""
    if not sys.stdin.isatty():
        return
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:
        pass
