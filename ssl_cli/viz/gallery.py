"""A gallery: one row per cluster or pseudo-label, a caption on the left, then its images.

The layout is in pixels so the picture's size follows from the request alone:
width = CAPTION_PX + columns x (thumb + GAP_PX) + GAP_PX, height = rows x (row height + GAP_PX) + GAP_PX.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ssl_cli.viz.figure import new_figure

CAPTION_PX = 230
GAP_PX = 4
MIN_ROW_PX = 56  # room for four caption lines, even when thumbnails are small
CAPTION_CHARS = 38  # what fits in CAPTION_PX at 8 pt
FLAG_RGB = (214, 39, 40)  # frame of an image whose class is not the row's majority


@dataclass(frozen=True)
class GalleryRow:
    """One row of the gallery.

    title: first caption line, in bold (e.g. "cluster 3"); details: the lines below it.
    images: up to `columns` RGB images, best first. flagged[i]: image i's known class differs
    from the row's majority class; it gets a red frame.
    """

    title: str
    details: tuple[str, ...]
    images: tuple[Image.Image, ...]
    flagged: tuple[bool, ...] = field(default=())


def gallery_size(rows: int, columns: int, thumb: int) -> tuple[int, int]:
    """(width, height) in pixels of a gallery of `rows` x `columns` thumbnails of side `thumb`."""
    row_px = max(thumb, MIN_ROW_PX)
    return CAPTION_PX + columns * (thumb + GAP_PX) + GAP_PX, rows * (row_px + GAP_PX) + GAP_PX


def thumbnail(image: Image.Image, side: int) -> np.ndarray:
    """(side, side, 3) uint8: the centre square of `image`, resized (nearest when enlarging, so
    small images stay crisp rather than blurred)."""
    method = Image.Resampling.NEAREST if min(image.size) < side else Image.Resampling.LANCZOS
    return np.asarray(ImageOps.fit(image.convert("RGB"), (side, side), method=method))


def draw_gallery(rows: Sequence[GalleryRow], columns: int, thumb: int) -> Any:
    """A matplotlib Figure of the rows (see the module docstring for its size).

    The thumbnails are laid into one pixel array shown 1:1 by a single image, which keeps drawing
    fast and exact however many images there are; matplotlib adds the captions.
    """
    width, height = gallery_size(len(rows), columns, thumb)
    row_px = max(thumb, MIN_ROW_PX)
    canvas = np.full((height, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        top = GAP_PX + r * (row_px + GAP_PX) + (row_px - thumb) // 2
        for c, image in enumerate(row.images[:columns]):
            left = CAPTION_PX + c * (thumb + GAP_PX)
            cell = canvas[top : top + thumb, left : left + thumb]
            cell[...] = thumbnail(image, thumb)
            if c < len(row.flagged) and row.flagged[c]:
                _frame(cell, FLAG_RGB, width=max(2, thumb // 24))
    figure = new_figure(width, height)
    whole = figure.add_axes((0, 0, 1, 1))
    whole.imshow(canvas, interpolation="nearest", aspect="auto")
    whole.axis("off")
    for r, row in enumerate(rows):
        top = GAP_PX + r * (row_px + GAP_PX)
        figure.text(8 / width, 1 - (top + 3) / height, _fit(row.title), fontsize=9, weight="bold", va="top")
        details = "\n".join(_fit(line) for line in row.details)
        figure.text(8 / width, 1 - (top + 17) / height, details, fontsize=8, va="top", linespacing=1.15)
    return figure


def _frame(cell: np.ndarray, rgb: tuple[int, int, int], width: int) -> None:
    """Paint a border of `width` pixels inside `cell` (H, W, 3), in place."""
    cell[:width], cell[-width:], cell[:, :width], cell[:, -width:] = rgb, rgb, rgb, rgb


def _fit(text: str) -> str:
    return text if len(text) <= CAPTION_CHARS else text[: CAPTION_CHARS - 1] + "…"
