"""Errors shared across the package."""


class ModelError(Exception):
    """A model cannot be found, read or loaded; the message says which and why."""


class Cancelled(Exception):
    """A job or run was cancelled; no result."""
