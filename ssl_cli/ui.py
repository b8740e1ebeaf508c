"""Everything the user sees: progress bars, result tables, errors. The only module importing rich."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)
out = Console()


class RichReporter:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    # soft_wrap: a message is never broken inside a word, so a path in it can be copied whole
    def info(self, message: str) -> None:
        console.print(message, soft_wrap=True)

    def warn(self, message: str) -> None:
        console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: int | None, unit: str = "img",
                 completed: int = 0) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n=1: None
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(description, total=total, completed=completed, rate="")
            start = completed

            def advance(n: int = 1) -> None:
                progress.advance(task, n)
                state = progress.tasks[task]
                if state.elapsed:
                    progress.update(task, rate=f"{(state.completed - start) / state.elapsed:,.0f} {unit}/s")

            yield advance


def error(message: str) -> None:
    # escaped: a message is plain text, and "[viz]" in `pip install 'ssl-cli[viz]'` is not a style
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def show_result(result: Any) -> None:
    """A stage result: status line, then its summary as a two-column table (rank 0 only under torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return
    status = "[green]up to date[/green]" if result.status == "up to date" else result.status
    out.print(f"ssl {result.stage}: {result.out} ({status})", soft_wrap=True, highlight=False)
    if not result.summary:
        return
    table = Table(show_header=False)
    # fold, not the default ellipsis: a path longer than the column breaks across lines, never loses its end
    table.add_column("key", style="bold", overflow="fold")
    table.add_column("value", overflow="fold")
    for key, value in result.summary.items():
        table.add_row(key, _format(value))
    out.print(table)


def show_plan(rows: list[dict[str, str]]) -> None:
    table = Table(title="plan", title_justify="left")
    for column in ("stage", "command", "action", "why"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["stage"], row["command"], row["action"], row["why"])
    out.print(table)


def show_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Rows of one shape as a table whose columns are the first row's keys (None shows as '-')."""
    if os.environ.get("RANK", "0") != "0" or not rows:
        return
    table = Table(title=title, title_justify="left")
    for column in rows[0]:
        table.add_column(column.replace("_", " "), overflow="fold")
    for item in rows:
        table.add_row(*("-" if value is None else _format(value) for value in item.values()))
    out.print(table)


def show_artifact(path: str, info: dict[str, Any]) -> None:
    attrs = dict(info["attrs"])
    head = Table(title=f"{path}", show_header=False, title_justify="left")
    head.add_column("attribute", style="bold")
    head.add_column("value", overflow="fold")
    for key in ("schema", "fingerprint", "code_version", "created"):
        if key in attrs:
            head.add_row(key, str(attrs.pop(key)))
    for key in ("config", "inputs"):
        if key in attrs:
            head.add_row(key, json.dumps(_parsed_json(attrs.pop(key)), indent=1, default=str))
    for key, value in sorted(attrs.items()):
        head.add_row(key, _summarise(value))
    out.print(head)
    if info.get("kind") == "checkpoint":
        out.print(_tensor_table(info["datasets"]))
        return
    data = Table(title="datasets", title_justify="left")
    for column in ("name", "shape", "dtype"):
        data.add_column(column)
    for item in info["datasets"]:
        data.add_row(item["name"], "x".join(str(s) for s in item["shape"]) or "scalar", item["dtype"])
    out.print(data)


TENSOR_ROWS = 40  # modules shown in a checkpoint's tensor table; a ResNet-50 has 160


def _tensor_table(tensors: list[dict[str, Any]]) -> Table:
    """A checkpoint's tensors one module a row (weight, bias and buffers together), the first TENSOR_ROWS modules,
    titled with the count and size of them all."""
    modules: dict[str, list[dict[str, Any]]] = {}
    for item in tensors:
        module, _, _ = item["name"].rpartition(".")
        modules.setdefault(module or item["name"], []).append(item)
    values = sum(_numel(item["shape"]) for item in tensors)
    table = Table(title=f"tensors: {len(tensors)} in {len(modules)} modules, {values:,} values", title_justify="left")
    for column in ("module", "tensors", "dtype"):
        table.add_column(column)
    for module, items in list(modules.items())[:TENSOR_ROWS]:
        shapes = ", ".join(f"{item['name'].rpartition('.')[2]} {'x'.join(map(str, item['shape'])) or 'scalar'}"
                           for item in items)
        table.add_row(module, shapes, ", ".join(dict.fromkeys(item["dtype"] for item in items)))
    if len(modules) > TENSOR_ROWS:
        table.add_row(f"... {len(modules) - TENSOR_ROWS} more modules", "", "")
    return table


def _numel(shape: Any) -> int:
    count = 1
    for side in shape:
        count *= int(side)
    return count


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format(v)}" for k, v in value.items())
    return str(value)


def _parsed_json(value: Any) -> Any:
    """A JSON attribute as its object (a checkpoint's meta keeps config and inputs as JSON text)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


SUMMARY_ITEMS = 12  # a list longer than this prints as its shape and first values


def _summarise(value: Any) -> str:
    """An attribute in a line or a few: a long array-like list (701 jigsaw permutations) as its shape, dtype and
    first values, a list of records (the training history) as its length and last record."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_summarise(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)) and len(value) > SUMMARY_ITEMS:
        shape, dtype = _array_shape(value)
        if shape is not None:
            return f"{' x '.join(map(str, shape))} {dtype} {_preview(value)}"
        return f"{', '.join(map(str, value[:3]))}, ... ({len(value)} in all)"
    if isinstance(value, (list, tuple)) and len(value) > 1 and all(isinstance(item, dict) for item in value):
        return f"{len(value)} records; last: {_summarise(value[-1])}"
    return _format(value)


def _array_shape(value: list) -> tuple[tuple[int, ...] | None, str]:
    """The shape and dtype of a rectangular list of numbers (nested lists of equal lengths), else (None, "")."""
    shape: list[int] = []
    level: list = [value]
    while all(isinstance(item, (list, tuple)) for item in level):
        lengths = {len(item) for item in level}
        if len(lengths) != 1 or not lengths.pop():
            return None, ""
        shape.append(len(level[0]))
        level = [child for item in level for child in item]
    if not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in level):
        return None, ""
    return tuple(shape), "int64" if all(isinstance(item, int) for item in level) else "float64"


def _preview(value: Any, items: int = 2) -> str:
    """'[[7, 5, ...], [5, 0, ...], ...]': the first `items` entries at every level."""
    if not isinstance(value, (list, tuple)):
        return _format(value)
    shown = [_preview(item, items) for item in value[:items]]
    return "[" + ", ".join(shown + (["..."] if len(value) > items else [])) + "]"
