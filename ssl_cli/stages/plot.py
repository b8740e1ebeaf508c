"""`ssl plot`: training curves from `<stem>.metrics.jsonl` files, one panel per numeric metric.

The training loop writes one JSON object per epoch (epoch, loss, accuracy, lr, images_per_second,
seconds, and whatever a stage adds); every key with a number in some epoch is a metric.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.viz.curves import Curve, curves_size, draw_curves
from ssl_cli.viz.figure import check_out, require_matplotlib, save_figure

FIRST = ("loss", "accuracy")  # shown first when present; the rest keep the files' order
WHAT = "a <stem>.metrics.jsonl written beside a checkpoint by a training stage"


@claim_scope()
def run(paths: list[Path], out: Path, *, labels: list[str] | None = None, metrics: list[str] | None = None,
        force: bool = False, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    if not paths:
        raise UserError(f"pass at least one metrics file: {WHAT}")
    if labels and len(labels) != len(paths):
        raise UserError(f"{len(labels)} --label value(s) for {len(paths)} file(s); give one --label per "
                        "file, in the same order, or none")
    claim_output(out)  # one writer per picture; released when run returns
    fmt = check_out(out, force)
    require_matplotlib()
    runs = [read_curve(path, label) for path, label in zip(paths, labels or run_labels(paths))]
    chosen = choose_metrics(runs, metrics)
    save_figure(draw_curves(runs, chosen), out, fmt)
    width, height = curves_size(len(chosen))
    summary = {"runs": ", ".join(run.label for run in runs), "metrics": ", ".join(chosen),
               "epochs": ", ".join(str(len(run.epochs)) for run in runs), "pixels": f"{width}x{height}"}
    return StageResult("plot", out, "written", summary)


def run_labels(paths: list[Path]) -> list[str]:
    """Legend names: the file name without `.metrics.jsonl`; with the parent folder where names clash."""
    stems = [path.name.removesuffix(".jsonl").removesuffix(".metrics") for path in paths]
    clashes = Counter(stems)
    return [f"{path.parent.name}/{stem}" if clashes[stem] > 1 else stem for path, stem in zip(paths, stems)]


def read_curve(path: Path, label: str) -> Curve:
    """One run's epochs (E,) and every numeric metric as (E,) float (NaN where an epoch lacks it)."""
    if not path.is_file():
        raise UserError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}; pass {WHAT}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number} is not JSON ({error.msg}); pass {WHAT}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number} is a JSON {type(row).__name__}, not an object per epoch; "
                            f"pass {WHAT}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} is empty (no epoch finished yet?); pass {WHAT}")
    epochs = np.array([row["epoch"] if _is_number(row.get("epoch")) else i + 1 for i, row in enumerate(rows)],
                      dtype=np.float64)
    names = list(dict.fromkeys(key for row in rows for key in row if key != "epoch" and _is_number(row[key])))
    if not names:
        keys = ", ".join(dict.fromkeys(key for row in rows for key in row)) or "none"
        raise UserError(f"{path} has no numeric metric (keys: {keys}); pass {WHAT}")
    values = {name: np.array([row[name] if _is_number(row.get(name)) else math.nan for row in rows],
                             np.float64) for name in names}
    return Curve(label, epochs, values)


def choose_metrics(runs: list[Curve], wanted: list[str] | None) -> list[str]:
    """The metrics to draw: `wanted` in its order (each must be in some run), else every metric of
    any run, loss and accuracy first."""
    available = list(dict.fromkeys(name for run in runs for name in run.values))
    if wanted:
        unknown = [name for name in wanted if name not in available]
        if unknown:
            raise UserError(f"--metrics {', '.join(unknown)}: in none of the files; they have "
                            f"{', '.join(available)}")
        return list(dict.fromkeys(wanted))
    return [name for name in FIRST if name in available] + [name for name in available if name not in FIRST]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
