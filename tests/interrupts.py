"""Stand-ins that stop a stage part-way, as a kill would (the tests then run the same command again)."""

from __future__ import annotations

from collections.abc import Callable


def dies_on_call(real: Callable, call: int) -> Callable:
    """`real`, except that its `call`-th call (1-based) raises KeyboardInterrupt instead of running."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return stand_in
