"""cli/text.py: how a reply is printed (reasoning framed, dimmed on a terminal, or hidden) and the sampling flags."""

from __future__ import annotations

import argparse
import io
import os
import select

import pytest

from mlxrunner.cli.text import DIM, PLAIN, ReplyWriter, add_sampling_flags, options_from
from mlxrunner.request import Options
from mlxrunner.text.tool_calls import OutputParser

THINKING_REPLY = "<think>\nThe user greets me.\n</think>\n\nHello!"


def printed(text: str, writer: ReplyWriter, pieces: int = 3) -> None:
    """Feed `text` through the chat route's parser in a few pieces, as a stream would, into `writer`."""
    parser = OutputParser(tool_calls=False)
    step = max(1, len(text) // pieces)
    for start in range(0, len(text), step):
        for event in parser.feed(text[start:start + step]):
            writer.write(event)
    for event in parser.finish():
        writer.write(event)
    writer.finish()


def test_reasoning_is_framed_like_ollama_run_and_the_content_follows():
    out = io.StringIO()
    printed(THINKING_REPLY, ReplyWriter(out))
    assert out.getvalue() == "Thinking...\nThe user greets me.\n...done thinking.\n\nHello!"


def test_hide_thinking_prints_the_content_only():
    out = io.StringIO()
    printed(THINKING_REPLY, ReplyWriter(out, show_thinking=False))
    assert out.getvalue() == "Hello!"


def read_all(fd: int) -> bytes:
    """Everything the terminal has to give: one read returns only what its line discipline has passed on so far."""
    data = b""
    while select.select([fd], [], [], 0.5)[0]:
        data += os.read(fd, 4096)
    return data


def test_on_a_terminal_the_reasoning_is_dim():
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            printed(THINKING_REPLY, ReplyWriter(terminal))
        shown = read_all(master).decode()
    finally:
        os.close(master)
        os.close(slave)
    # The terminal writes newlines as CR LF.
    assert shown == (DIM + "Thinking...\nThe user greets me.\n...done thinking.\n\n" + PLAIN + "Hello!").replace(
        "\n", "\r\n")


def test_a_reply_without_reasoning_is_printed_as_it_is():
    out = io.StringIO()
    printed("Just <b>text</b>, no thinking.", ReplyWriter(out))
    assert out.getvalue() == "Just <b>text</b>, no thinking."


def parse(*argv: str) -> Options:
    parser = argparse.ArgumentParser(prog="test")
    add_sampling_flags(parser)
    parser.add_argument("--seed", type=int)
    return options_from(parser.parse_args(list(argv)), parser)


def test_sampling_flags_become_completion_options_and_unset_ones_stay_the_runners():
    assert parse() == Options()
    assert parse("-n", "7", "--temperature", "0", "--top-k", "5", "--top-p", "0.5", "--min-p", "0.1",
                 "--repeat-penalty", "1", "--seed", "-3") == Options(num_predict=7, temperature=0.0, top_k=5,
                                                                      top_p=0.5, min_p=0.1, repeat_penalty=1.0,
                                                                      seed=-3)


def test_a_sampling_flag_out_of_bounds_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        parse("--top-p", "1.5")
    assert exited.value.code == 2
    assert 'argument --top-p: field "options.top_p" must be between 0 and 1, got 1.5' in capsys.readouterr().err
