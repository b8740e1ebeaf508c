"""How stages tell the outside world what they are doing, without importing rich.

Stages take a `Reporter`; the CLI passes `ui.RichReporter`, tests and scripts the silent default.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Protocol


class Reporter(Protocol):
    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def progress(self, description: str, total: int | None, unit: str = "img", completed: int = 0):
        """Context manager yielding `advance(n)`; shows items/s for `unit`."""
        ...


class SilentReporter:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.messages.append(f"warning: {message}")

    @contextmanager
    def progress(
        self, description: str, total: int | None, unit: str = "img", completed: int = 0
    ) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None
