"""The package's typed errors: whose fault a failure is decides how it is reported.

- `RequestError`: the client asked for something wrong (HTTP 400, or the status it carries).
- `ModelError`: the model cannot be found, read or loaded (a load error: exit 1, /health 500).
- `Cancelled`: a job or run was stopped before it finished (the client left, the runner is stopping).

Anything else raised while serving a request is an internal error: HTTP 500 and a log line.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A client error: HTTP 400 (or `status`), with a message that names the field.

    `field` is the request field at fault, where there is one (OpenAI-style errors report it as
    `param`). A ValueError subclass, so the Python API's callers can catch it as before.
    """

    def __init__(self, message: str, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


class ModelError(Exception):
    """A model cannot be found, read or loaded; the message says which and why."""


class Cancelled(Exception):
    """A job or run was cancelled; no result. The message says why."""
