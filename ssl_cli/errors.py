"""The two kinds of failure a user sees: their input is wrong (exit 2) or something broke (exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or usage. The message says what is wrong and what to do; the CLI exits with 2."""

    exit_code = 2


class StageError(Exception):
    """A stage could not finish for a reason that is not the user's input; the CLI exits with 1."""

    exit_code = 1
