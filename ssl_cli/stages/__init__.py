"""One module per stage; each `run(cfg, reporter) -> StageResult` and none imports typer or rich."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    stage: str
    out: Path
    status: str  # "written", "resumed", "up to date"
    summary: dict[str, Any] = field(default_factory=dict)
