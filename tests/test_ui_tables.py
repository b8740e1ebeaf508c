"""Result, plan and summary tables never cut a path short, however narrow the terminal."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from ssl_cli import ui

LONG = "runs/toy/self-train/round-1/student.metrics.jsonl"


@pytest.fixture
def narrow(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(ui, "out", Console(file=buffer, width=40, color_system=None))
    return buffer


def column(text: str, index: int) -> str:
    """Column `index` of a table's body rows, folded lines joined again."""
    return "".join(line.split("│")[index + 1].strip() for line in text.splitlines() if line.startswith("│"))


def test_show_table_folds_long_paths(narrow) -> None:
    ui.show_table("runs", [{"artifact": LONG, "rows": 480, "nmi": 0.62}, {"artifact": "x", "rows": 1, "nmi": None}])
    text = narrow.getvalue()
    assert "…" not in text and column(text, 0) == LONG + "x"


def test_show_result_and_plan_fold_long_paths(narrow) -> None:
    ui.show_result(SimpleNamespace(stage="retrain", out=LONG, status="written", summary={"metrics": LONG}))
    result = narrow.getvalue()
    assert "…" not in result and column(result, 1) == LONG
    narrow.truncate(0), narrow.seek(0)
    ui.show_plan([{"stage": "self-train", "command": "self-train", "action": "run", "why": LONG}])
    plan = narrow.getvalue()
    assert "…" not in plan and column(plan, 3) == LONG
