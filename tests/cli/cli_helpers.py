"""What the terminal tests share: the tiny Qwen3 with Qwen3's chat template, the in-process greedy reference, and a
pseudo-terminal to run `mlxrunner chat` in."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

from mlxrunner.request import Options
from mlxrunner.text.tool_calls import ParsedOutput, parse_output, prompt_ends_in_reasoning

FIXTURES = Path(__file__).parents[1] / "fixtures"
QWEN3 = FIXTURES / "llm" / "qwen3-tiny"  # no chat template: a base model
GREEDY = ("--temperature", "0", "--repeat-penalty", "1")  # greedy = no sampling and no penalties
# Prompts whose greedy replies (through Qwen3's template) end at an end-of-turn token within a hundred tokens,
# and one that goes on for thousands.
SHORT_PROMPT, ENDLESS_PROMPT = "a", "hello world"


def greedy_reply(model, messages: list[dict], num_predict: int, **template_kwargs) -> tuple[ParsedOutput, object]:
    """The model's greedy answer to the conversation, in process, as the OpenAI chat route makes it: the
    template's prompt as token ids, its end-of-turn tokens as stops, the output split into content and
    reasoning. Returns (the split output, the Completion)."""
    rendered = model.chat_template.render(messages, **template_kwargs)
    options = Options(temperature=0.0, repeat_penalty=1.0, num_predict=num_predict)
    *chunks, completion = model.stream(model.tokenize(rendered), options,
                                       stop_token_ids=model.chat_template.eos_token_ids)
    text = "".join(chunks)
    return parse_output(text, tool_calls=False, starts_in_reasoning=prompt_ends_in_reasoning(rendered)), completion


def on_terminal(text: str) -> bytes:
    """Text as a terminal shows it: the line discipline writes each newline as CR LF."""
    return text.replace("\n", "\r\n").encode()


class Terminal:
    """`python -m mlxrunner ARGS` with a pseudo-terminal as its controlling terminal, stdin, stdout and stderr.

    Writing b"\\x03" is Ctrl-C (the terminal sends SIGINT to the process) and b"\\x04" at an empty line Ctrl-D.
    A Ctrl-C typed while the program is not reading a line is echoed as the byte itself, not as "^C" (ECHOCTL
    off), so a test can take it out of the output.
    """

    def __init__(self, *args: str):
        self.master, slave = pty.openpty()
        attributes = termios.tcgetattr(slave)
        attributes[3] &= ~termios.ECHOCTL
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        # TERM=dumb: readline draws no escape sequences (bracketed paste and the like) around the prompt.
        self.process = subprocess.Popen([sys.executable, "-m", "mlxrunner", *args], stdin=slave, stdout=slave,
                                        stderr=slave, preexec_fn=_take_terminal, close_fds=True,
                                        env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.pending = b""

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, marker: bytes, timeout: float = 30) -> bytes:
        """Everything up to and including the first `marker`; the rest stays for the next read."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            self._read(deadline, f"no {marker!r}")
        end = self.pending.index(marker) + len(marker)
        out, self.pending = self.pending[:end], self.pending[end:]
        return out

    def read_some(self, timeout: float = 30) -> bytes:
        """At least one byte more than what is pending."""
        deadline = time.monotonic() + timeout
        before = len(self.pending)
        while len(self.pending) == before:
            self._read(deadline, "no output")
        return self.pending[before:]

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        self.close()
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def _read(self, deadline: float, what: str) -> None:
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"{what} after {self.pending[-400:]!r}")
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the process closed the terminal
            chunk = b""
        if not chunk:
            raise EOFError(f"{what}: the process ended (code {self.process.poll()}) after {self.pending[-400:]!r}")
        self.pending += chunk


def _take_terminal() -> None:
    """In the child: a session of its own, with the pseudo-terminal (its stdin) as the controlling terminal."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
