"""Which process this is among torchrun's ranks, without importing torch (`distributed` re-exports these).

Stages that run in one process unless launched by torchrun (`ssl cluster`'s faiss backend) decide from
these whether to load torch.distributed at all: torch costs ~1.8 s of start and ~300 MB of RSS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_world() -> tuple[int, int]:
    """(rank, world size) torchrun gave this process; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
