"""The CLI's error contract: a user error is one ``error:`` line and exit status 2."""

from __future__ import annotations

import pytest

from envs import errors as suite
from vla_ft import cli


@pytest.mark.parametrize(
    "exc",
    [
        suite.UnknownTaskError("unknown task 'pick_plate': did you mean 'pick_place'?"),
        suite.InvalidActionError("action has NaN entries"),
        suite.EnvError("env option 'goals' must be one of all, seen, held_out"),
    ],
)
def test_a_task_suite_error_is_one_line_and_exit_2(monkeypatch, capsys, exc):
    """The suite (envs/) has its own error classes; one that reaches the CLI unconverted is still
    reported as a user error, with its message, and no traceback."""

    def command(argv):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "finetune", command)
    assert cli.run_command("finetune", []) == 2
    err = capsys.readouterr().err
    assert err == f"error: {exc}\n"


def test_other_exceptions_are_not_swallowed(monkeypatch):
    def command(argv):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "finetune", command)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.run_command("finetune", [])
