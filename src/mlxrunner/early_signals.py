"""SIGINT/SIGTERM from the first instant of a runner process, before MLX and the server are imported.

A parent server may stop a runner right after starting it. Until cli/signals.py installs the real
handlers (after `import mlxrunner`, which loads MLX: ~0.1 s), Python's default handlers would kill
the process with nothing on stderr. So the package's first act, when this process was started as
the runner (`mlxrunner ...` or `python -m mlxrunner ...`), is to install handlers that only record
what came; cli/signals.py takes them over and acts on the recorded signals. Library imports and the
commands for people (embed, generate, chat, quantize: Ctrl-C there is Python's KeyboardInterrupt)
are left alone.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
COMMANDS_FOR_PEOPLE = frozenset({"embed", "generate", "chat", "quantize"})

_received: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def runner_arguments(orig_argv: list[str]) -> list[str] | None:
    """The arguments after the program if the command line starts the runner, else None."""
    if len(orig_argv) >= 2 and Path(orig_argv[1]).name == "mlxrunner":  # the console script
        return orig_argv[2:]
    for index, arg in enumerate(orig_argv[1:-1], start=1):  # python [options] -m mlxrunner ...
        if arg == "-m":
            return orig_argv[index + 2:] if orig_argv[index + 1] == "mlxrunner" else None
    return None


def install_if_started_as_the_runner() -> None:
    arguments = runner_arguments(list(getattr(sys, "orig_argv", sys.argv)))
    if arguments is None or (arguments and arguments[0] in COMMANDS_FOR_PEOPLE):
        return
    try:
        for sig in SIGNALS:
            signal.signal(sig, _record)
    except ValueError:  # not the main thread: then this is not a runner starting up
        return


def take_received() -> list[int]:
    """The signals recorded so far (oldest first); recording stops counting them from here."""
    taken = list(_received)
    _received.clear()
    return taken
