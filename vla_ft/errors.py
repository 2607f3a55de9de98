"""User-facing errors.

Every error a user can cause with a bad file, key or value is a `VLAFTError` whose message names the
file/key/value and says how to fix it. The CLI prints such errors as one line and exits non-zero;
anything else is a bug and keeps its traceback.
"""


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
