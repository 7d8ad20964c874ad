"""Logging to stderr in Ollama's style: one `key=value` line per record, each well under 64 KiB.

Ollama's parent reads the runner's stderr with a 64 KiB line scanner (a longer line stops its
reader and can block us on a full pipe), and keeps the last line as the error to show. So every
record is one line: newlines are escaped and long messages are cut.
"""

from __future__ import annotations

import logging
import sys
import time

MAX_LINE = 16 * 1024
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_SLOG_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN", logging.ERROR: "ERROR",
               logging.CRITICAL: "ERROR", TRACE: "TRACE"}
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def level_from_ollama_debug(value: str) -> int:
    """OLLAMA_DEBUG -> Python level: unset/0/false INFO, 1/true DEBUG, n -> slog level -4n."""
    if value == "" or value in _FALSE:
        return logging.INFO
    if value in _TRUE:
        return logging.DEBUG
    try:
        n = int(value)
    except ValueError:
        return logging.INFO  # Ollama ignores a value it cannot parse
    # slog INFO=0, DEBUG=-4, WARN=4, each step of 4 is one Python step of 10.
    return max(1, min(logging.CRITICAL, logging.INFO - 10 * n))


def level_from_name(name: str) -> int:
    names = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
             "warning": logging.WARNING, "error": logging.ERROR}
    if name.lower() not in names:
        raise ValueError(f"unknown log level {name!r} (use one of {', '.join(names)})")
    return names[name.lower()]


class OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info)
        message = message.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        if len(message) > MAX_LINE:
            message = message[:MAX_LINE] + f"... ({len(message) - MAX_LINE} more characters)"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        level = _SLOG_NAMES.get(record.levelno, record.levelname)
        return f'time={stamp}.{int(record.msecs):03d} level={level} source={record.name} msg="{message}"'


def setup(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The access log is one line per request at INFO: shown only when debugging.
    logging.getLogger("mlxrunner.access").setLevel(logging.INFO if level <= logging.DEBUG else logging.WARNING)
