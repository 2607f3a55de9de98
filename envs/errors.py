"""Errors raised by the task suite (user-caused ones derive from ``vla_ft.errors.EnvError``)."""

from vla_ft.errors import EnvError


class UnknownTaskError(EnvError, ValueError):
    """A task name that is not registered; the message lists the valid names."""


class InvalidActionError(EnvError, ValueError):
    """An action with NaN/Inf entries or the wrong shape."""


__all__ = ["EnvError", "UnknownTaskError", "InvalidActionError"]
