"""`mlxrunner chat`: a conversation in a pseudo-terminal, checked against the model's greedy replies in process.

Each reply must be the greedy reply to the whole conversation so far, rendered by the chat template: so the
history reaches the model, and /clear forgets it. Ctrl-C stops a reply and the chat goes on; Ctrl-D leaves.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from cli_helpers import (
    ENDLESS_PROMPT,
    GREEDY,
    QWEN3,
    SHORT_PROMPT,
    Terminal,
    greedy_reply,
    on_terminal,
)
from conftest import chat_model_folder, run_cli

from mlxrunner.cli.chat import Conversation
from mlxrunner.cli.text import ReplyWriter, StopOnCtrlC
from mlxrunner.llm import load
from mlxrunner.request import Options

PROMPT = b">>> "
TOKENS = 16


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return chat_model_folder(tmp_path_factory.mktemp("qwen3-chat"))


@pytest.fixture(scope="module")
def chat_model(chat_folder):
    return load(str(chat_folder))


def chat(folder, *args: str) -> Terminal:
    terminal = Terminal("chat", "--model", str(folder), "--log-level", "error", *GREEDY, *args)
    terminal.read_until(PROMPT)
    return terminal


def say(terminal: Terminal, message: str) -> bytes:
    """Type a message and Enter; what the terminal showed up to the next prompt, less the echoed message."""
    terminal.send(message.encode() + b"\r")
    shown = terminal.read_until(PROMPT)
    echo = on_terminal(message + "\n")
    assert shown.startswith(echo), shown
    return shown[len(echo):-len(PROMPT)]


def test_replies_follow_the_conversation_and_clear_forgets_it(chat_folder, chat_model):
    terminal = chat(chat_folder, "-n", str(TOKENS))
    try:
        history = []
        for message in (SHORT_PROMPT, "hello"):
            history.append({"role": "user", "content": message})
            expected, _ = greedy_reply(chat_model, history, TOKENS)
            assert say(terminal, message) == on_terminal(expected.content + "\n\n")
            history.append({"role": "assistant", "content": expected.content})
        assert say(terminal, "/clear") == on_terminal("Cleared session context\n")
        fresh, _ = greedy_reply(chat_model, [{"role": "user", "content": "hello"}], TOKENS)
        second, _ = greedy_reply(chat_model, history[:3], TOKENS)
        assert fresh.content != second.content  # else the history would make no difference
        assert say(terminal, "hello") == on_terminal(fresh.content + "\n\n")
        terminal.send(b"\x04")  # Ctrl-D at an empty prompt
        assert terminal.wait() == 0
    finally:
        terminal.close()


def ctrl_c_at_the_prompt(terminal: Terminal) -> None:
    """Ctrl-C once the prompt is up. Python's readline prints the prompt, then waits in select() and looks at
    signals only when that wait is interrupted: a SIGINT that lands between the two (a test that types the
    instant the prompt shows; no person is that fast) is noticed only at the next key. So wait a moment."""
    time.sleep(0.3)
    terminal.send(b"\x03")


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(chat_folder, chat_model):
    terminal = chat(chat_folder, "-n", "3000")
    try:
        terminal.send(ENDLESS_PROMPT.encode() + b"\r")
        terminal.read_until(on_terminal(ENDLESS_PROMPT + "\n"))
        terminal.read_some()  # the reply has begun
        terminal.send(b"\x03")
        partial = terminal.read_until(PROMPT)[:-len(PROMPT)]
        assert partial.endswith(b"\r\n\r\n") and terminal.process.poll() is None
        # The terminal echoes the Ctrl-C among the reply's characters (this reply has no \x03 of its own).
        assert partial.count(b"\x03") == 1
        shown = partial[:-4].replace(b"\x03", b"").decode().replace("\r\n", "\n")
        # What was shown is the start of the greedy reply, which would have gone on (num_predict, not an end of turn).
        expected, completion = greedy_reply(chat_model, [{"role": "user", "content": ENDLESS_PROMPT}],
                                            len(shown.encode()) + 8)
        assert completion.done_reason == "length"
        assert shown and expected.content.startswith(shown) and len(expected.content) > len(shown)
        ctrl_c_at_the_prompt(terminal)  # drops the line
        assert terminal.read_until(PROMPT) == on_terminal("\nUse Ctrl + d or /bye to exit.\n") + PROMPT
        assert say(terminal, "/clear") == on_terminal("Cleared session context\n")
        short, completion = greedy_reply(chat_model, [{"role": "user", "content": SHORT_PROMPT}], 3000)
        assert completion.done_reason == "stop"
        assert say(terminal, SHORT_PROMPT) == on_terminal(short.content + "\n\n")
        ctrl_c_at_the_prompt(terminal)
        terminal.read_until(PROMPT)
        ctrl_c_at_the_prompt(terminal)  # a second Ctrl-C in a row leaves
        assert terminal.wait() == 0
    finally:
        terminal.close()


def test_system_prompt_commands_and_a_message_of_several_lines_from_a_pipe(chat_folder, chat_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    expected, completion = greedy_reply(chat_model, messages, TOKENS)
    result = run_cli("chat", "--model", str(chat_folder), *GREEDY, "-n", str(TOKENS), "--system", "Be brief.",
                     "--verbose", stdin='/?\n/nope\n"""a\nb"""\n/bye\nnever answered\n')
    assert result.returncode == 0, result.stderr
    help_text, unknown, reply, end = result.stdout.split(PROMPT.decode())[1:]
    assert "/clear" in help_text and "/bye" in help_text
    assert unknown == "Unknown command '/nope'. Type /? for help\n"
    assert reply == "... " + expected.content + "\n\n"  # the continuation prompt, then the reply
    assert end == ""
    # --verbose: generate's stats line after the reply
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"prompt: {completion.prompt_eval_count} tokens, ")


def test_a_message_past_the_context_is_an_error_and_the_chat_goes_on_without_it(chat_folder, chat_model):
    too_long = "hello " * chat_model.context_length
    expected, _ = greedy_reply(chat_model, [{"role": "user", "content": SHORT_PROMPT}], TOKENS)
    result = run_cli("chat", "--model", str(chat_folder), *GREEDY, "-n", str(TOKENS),
                     stdin=f"{too_long}\n{SHORT_PROMPT}\n")
    assert result.returncode == 0, result.stderr
    refused, reply, end = result.stdout.split(PROMPT.decode())[1:]
    assert refused == "" and reply == expected.content + "\n\n" and end == "\n"  # Ctrl-D's newline
    assert "Error: the conversation no longer fits the model's context (the prompt has " in result.stderr
    assert "/clear to start again" in result.stderr


def test_a_stopped_reply_stays_in_the_conversation_as_far_as_it_got(chat_model):
    printed = []

    class CtrlCAfterFourPieces(ReplyWriter):
        def write(self, event) -> None:
            printed.append(event.text)
            if len(printed) == 4:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, mid-reply

    conversation = Conversation(chat_model, Options(temperature=0.0, repeat_penalty=1.0, num_predict=3000))
    with StopOnCtrlC() as stop:
        reply = conversation.answer(ENDLESS_PROMPT, CtrlCAfterFourPieces(open(os.devnull, "w")), stop)
    assert reply.completion is None and len(printed) >= 4
    assert conversation.messages == [{"role": "user", "content": ENDLESS_PROMPT},
                                     {"role": "assistant", "content": "".join(printed)}]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again


def test_a_model_without_a_chat_template_cannot_chat():
    result = run_cli("chat", "--model", str(QWEN3))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {QWEN3} has no chat template (it is a base model, or its chat_template is missing), so it cannot "
        "chat: use mlxrunner generate --raw for plain prompts")
    assert "loading" not in result.stderr  # refused before the weights are read
