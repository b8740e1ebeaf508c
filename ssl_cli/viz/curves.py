"""Training curves: one panel per metric, one line per run, a legend naming the runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssl_cli.viz.figure import new_figure

PANEL_PX = (380, 270)
MAX_COLUMNS = 3


@dataclass(frozen=True)
class Curve:
    """One run: label (legend name), epochs (E,) and values: metric -> (E,) float, NaN where an
    epoch lacks the metric (e.g. accuracy of a task that has none)."""

    label: str
    epochs: np.ndarray
    values: dict[str, np.ndarray]


def curves_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with `panels` panels."""
    columns = min(panels, MAX_COLUMNS)
    return columns * PANEL_PX[0], math.ceil(panels / columns) * PANEL_PX[1]


def draw_curves(runs: Sequence[Curve], metrics: Sequence[str]) -> Any:
    """A matplotlib Figure: panel per metric (in `metrics` order), x = epoch."""
    from matplotlib.ticker import MaxNLocator

    columns = min(len(metrics), MAX_COLUMNS)
    rows = math.ceil(len(metrics) / columns)
    figure = new_figure(*curves_size(len(metrics)), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    panels = grid.ravel()
    for panel, metric in zip(panels, metrics):
        for run in runs:
            values = run.values.get(metric)
            if values is None or np.isnan(values).all():
                # skip the line but advance the colour cycle, so a run keeps its colour in every panel
                panel.plot([], [])
                continue
            # markers, so that a single epoch (or an epoch between two missing ones) still shows
            panel.plot(run.epochs, values, marker="o", markersize=3, linewidth=1.5, label=run.label)
        panel.set_title(metric.replace("_", " "), fontsize=10)
        panel.set_xlabel("epoch", fontsize=9)
        panel.tick_params(labelsize=8)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.grid(alpha=0.3)
    for panel in panels[len(metrics):]:
        panel.set_visible(False)
    handles = {}
    for panel in panels[: len(metrics)]:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        panels[0].legend(list(handles.values()), list(handles), fontsize=8)
    return figure
