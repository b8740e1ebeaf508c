"""matplotlib on demand (Agg canvas, never a screen) and the write-then-rename of a figure file."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ssl_cli.errors import UserError

INSTALL_HINT = "pip install 'ssl-cli[viz]' (or pip install matplotlib)"
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def require_matplotlib() -> ModuleType:
    """The `matplotlib` module, or a UserError naming the install command when it is missing."""
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        message = f"drawing pictures needs matplotlib, which is not installed; run: {INSTALL_HINT}"
        raise UserError(message) from None


def new_figure(width_px: int, height_px: int, dpi: int = 100, **kwargs: Any) -> Any:
    """A matplotlib Figure of `width_px` x `height_px` pixels on an Agg canvas (`kwargs` go to Figure).

    Built without pyplot, so no backend is chosen globally and no figure outlives its caller.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor="white", **kwargs)
    FigureCanvasAgg(figure)
    return figure


def check_out(out: Path, force: bool) -> str:
    """The file format for `out` (from its suffix); refuses to replace an existing file without --force."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"--out {out} must end in {', '.join(FORMATS)}, e.g. --out {out.with_suffix('.png')}")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path such as {out / 'picture.png'}")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it or choose another --out")
    return fmt


def save_figure(figure: Any, out: Path, fmt: str) -> Path:
    """Write `figure` to `<out>.partial` and rename it to `out`, so `out` is never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        figure.savefig(partial, format=fmt, dpi=figure.dpi)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return out
