"""A free TCP port for a torchrun launch: fixed ports collide when pytest-xdist runs two launches at once."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
