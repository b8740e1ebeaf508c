"""The failure a user can fix: bad input or usage (exit 2). Anything else is a crash (exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or usage. The message says what is wrong and what to do; the CLI exits with 2."""

    exit_code = 2
