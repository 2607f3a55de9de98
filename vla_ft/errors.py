"""User-facing errors.

Every error a user can cause with a bad file, key or value is a `VLAFTError` whose message names the
file/key/value and says how to fix it. The CLI prints such errors as one line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

import contextlib
import sys
from collections.abc import Iterator


class VLAFTError(Exception):
    """Base class: a problem with the user's input (config, data file, checkpoint)."""


class ConfigError(VLAFTError):
    """A config file, key or value is wrong."""


class DataError(VLAFTError):
    """A dataset file is missing, malformed or inconsistent."""


class CheckpointError(VLAFTError):
    """A checkpoint directory is missing files or does not match the model/config."""


class EnvError(VLAFTError):
    """An environment/task name or argument is wrong."""


class UnknownTaskError(EnvError, ValueError):
    """A task name the MuJoCo suite (envs/) does not have; the message lists the valid names."""


class InvalidActionError(EnvError, ValueError):
    """An action the MuJoCo suite (envs/) refuses: NaN/Inf entries or the wrong shape."""


def from_suite(exc: BaseException) -> BaseException:
    """``exc`` as this package's error (same message) when the MuJoCo task suite raised it, else ``exc``.

    The suite (envs/) stands alone and has its own error classes (``envs.errors``); where vla_ft
    calls it, its user errors become :class:`EnvError` (:class:`UnknownTaskError`,
    :class:`InvalidActionError`) so that they are reported like every other user error.
    """
    suite = sys.modules.get("envs.errors")  # not imported: nothing can have raised one of its errors
    if suite is None or not isinstance(exc, suite.EnvError):
        return exc
    if isinstance(exc, suite.UnknownTaskError):
        return UnknownTaskError(str(exc))
    if isinstance(exc, suite.InvalidActionError):
        return InvalidActionError(str(exc))
    return EnvError(str(exc))


@contextlib.contextmanager
def suite_errors() -> Iterator[None]:
    """Re-raise the MuJoCo task suite's errors raised in the block as this package's (:func:`from_suite`)."""
    try:
        yield
    except Exception as exc:
        ours = from_suite(exc)
        if ours is exc:
            raise
        raise ours from exc


def worker_message(exc: VLAFTError) -> str:
    """The user's one line of an error raised in a DataLoader worker.

    The DataLoader re-raises a worker's exception in the main process as the same type, with the
    worker's whole traceback as its message; the last line of that traceback holds the original
    message, which is what the user needs."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name = type(exc).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped on request and can go on)
    """Training stopped on SIGTERM/SIGINT after writing a resumable checkpoint.

    The CLI prints the message (rank 0) and exits with :data:`PREEMPTED_EXIT`.
    """


# sysexits.h EX_TEMPFAIL ("temporary failure, retry"): the exit status of a preempted run; a job
# script requeues on it and reruns the same command with train.resume=auto
PREEMPTED_EXIT = 75
