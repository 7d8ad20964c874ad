"""A small progress bar for the CLI, on stderr (stdout stays clean for results).

On a terminal it redraws one line; elsewhere (logs, pipes) it prints a line per 10 %.
"""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, label: str, total: int, width: int = 30, stream=None):
        self.label = label
        self.total = max(1, total)
        self.width = width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1

    def update(self, done: int) -> None:
        self.done = max(self.done, min(done, self.total))
        if self._tty:
            self.stream.write("\r" + self._line())
            self.stream.flush()
            return
        decile = self.done * 10 // self.total
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def _line(self) -> str:
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        return (f"{self.label:<10} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.done}/{self.total} {elapsed:5.1f}s")

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
