"""Errors raised by the task suite; a user-caused one (bad task name, option or action) is an
:class:`EnvError` whose message says how to fix it. The suite stands alone: a program using it (vla_ft
does) turns these into its own errors where it calls the suite."""


class EnvError(Exception):
    """A task name, env option or action the suite cannot take; the message names the fix."""


class UnknownTaskError(EnvError, ValueError):
    """A task name that is not registered; the message lists the valid names."""


class InvalidActionError(EnvError, ValueError):
    """An action with NaN/Inf entries or the wrong shape."""


__all__ = ["EnvError", "UnknownTaskError", "InvalidActionError"]
