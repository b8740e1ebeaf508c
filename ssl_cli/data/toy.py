"""Deterministic procedural images with class labels, for tests and demos.

Each class is a fixed combination of a shape, a hue and a background texture, derived from the
label alone. Each image draws its own position, scale, rotation, colour jitter, texture phase and
pixel noise from ``np.random.default_rng([seed, index])``, so any image can be regenerated on its
own, in any order or in parallel, and comes out byte-identical.

The classes are meant to be separable (even raw pixels cluster them well above chance) but not
trivially: two images of one class never match, and some classes share a shape, a hue or a texture.

A corpus of ``n`` images is drawn in blocks of consecutive indices (``draw_toy_blocks``), in a pool
of worker processes when asked; the blocks come back in index order, so whoever writes them (a
folder of PNGs here, an HDF5 store in ``stages.toy_data``) sees the same rows whatever the pool.
"""

from __future__ import annotations

import colorsys
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bars", "star")
HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}
TEXTURES = ("plain", "noise", "stripes", "checker")

# A label picks shape, hue and texture by its remainder modulo each count (not by mixed radix), so
# that even the first few classes differ in all three at once. By the Chinese remainder theorem
# the triples stay distinct for every label below the least common multiple of the counts.
MAX_CLASSES = math.lcm(len(SHAPES), len(HUES), len(TEXTURES))
MIN_SIZE = 16

# The per-image label shuffle gets its own stream: SeedSequence([seed]) and ([seed, 0]) hash to
# the same state, so seeding it with the bare seed would correlate it with image 0.
_LABEL_STREAM = 0x1ABE1

# Shapes are drawn on a canvas this many times larger, then downsampled with LANCZOS: PIL's
# polygon fill has no antialiasing of its own. The canvas is capped so huge sizes stay cheap.
_SUPERSAMPLE = 4
_MAX_CANVAS = 1024

# A block of consecutive images is one task of the pool: about 4 MiB of pixels (256 images at
# 32 px, 27 at 224 px), so a task is worth its pickling and the blocks in flight stay small.
_BLOCK_BYTES = 4 << 20
_MAX_BLOCK_ROWS = 256
_MIN_BLOCK_ROWS = 8
# Starting worker processes costs about half a second; fewer blocks than this are drawn in-process.
_MIN_POOL_BLOCKS = 4


def class_names(classes: int) -> list[str]:
    """Folder names of the first ``classes`` toy classes, e.g. ``c00_circle_red_plain``.

    The zero-padded index comes first so that a sorted listing (what folder datasets do) keeps
    the label order.

    Returns:
        list of ``classes`` strings; entry ``k`` names label ``k``.
    """
    _check_classes(classes)
    width = max(2, len(str(classes - 1)))
    names = []
    for label in range(classes):
        shape, hue, texture = _class_recipe(label)
        names.append(f"c{label:0{width}d}_{shape}_{hue}_{texture}")
    return names


def toy_labels(n: int, classes: int, seed: int) -> np.ndarray:
    """Balanced labels in a seeded random order.

    Returns:
        labels: (n,) int64 in ``[0, classes)``; class counts differ by at most 1.
    """
    _check_classes(classes)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_seed(seed)
    balanced = np.arange(n, dtype=np.int64) % classes
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_LABEL_STREAM,)))
    return rng.permutation(balanced)


def toy_sample_id(class_name: str, index: int) -> str:
    """The relative path of image ``index`` in a toy folder, ``<class_name>/<index:06d>.png``; also its
    sample id in a toy HDF5 store, so the two forms of one corpus join by id."""
    return f"{class_name}/{index:06d}.png"


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def block_rows_for(size: int) -> int:
    """Images per block for side ``size``: about 4 MiB of pixels, between 8 and 256 images."""
    return max(_MIN_BLOCK_ROWS, min(_MAX_BLOCK_ROWS, _BLOCK_BYTES // (size * size * 3)))


def draw_toy_block(first: int, labels: np.ndarray, classes: int, size: int, seed: int) -> np.ndarray:
    """Images ``first .. first + len(labels) - 1``, image ``first + j`` of class ``labels[j]``.

    Returns:
        images: (len(labels), size, size, 3) uint8, row ``j`` equal to
        ``draw_toy_image(first + j, labels[j], classes, size, seed)``.
    """
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for offset, label in enumerate(labels.tolist()):
        images[offset] = draw_toy_image(first + offset, label, classes, size, seed)
    return images


def draw_toy_blocks(
    n: int,
    classes: int,
    size: int,
    seed: int,
    start: int = 0,
    workers: int = 1,
    block_rows: int | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Draw images ``start .. n - 1`` of the toy corpus of ``n`` images, in blocks, in index order.

    ``workers > 1`` draws the blocks in that many processes (when there are enough blocks to pay
    for starting them); at most two blocks per worker are in flight, so memory stays bounded in
    ``n``. The result does not depend on ``workers`` or ``block_rows``.

    Yields:
        (first, images, labels): the block's first index, (b, size, size, 3) uint8 images and
        their (b,) int64 labels, ``labels == toy_labels(n, classes, seed)[first:first + b]``.
    """
    _check_corpus(n, classes, size, seed)
    if not 0 <= start <= n:
        raise ValueError(f"start must be in [0, {n}], got {start}")
    labels = toy_labels(n, classes, seed)
    rows = block_rows or block_rows_for(size)
    firsts = range(start, n, rows)
    tasks = ((first, labels[first : first + rows], classes, size, seed) for first in firsts)
    for first, images in zip(firsts, _ordered_map(draw_toy_block, tasks, len(firsts), workers)):
        yield first, images, labels[first : first + len(images)]


def draw_toy_image(index: int, label: int, classes: int, size: int, seed: int) -> np.ndarray:
    """Render toy image ``index`` of class ``label``.

    The class fixes shape, hue and background texture; ``(seed, index)`` fixes everything else,
    so the result does not depend on which other images were drawn before.

    Returns:
        image: (size, size, 3) uint8 RGB.
    """
    _check_classes(classes)
    if not 0 <= label < classes:
        raise ValueError(f"label must be in [0, {classes}), got {label}")
    _check_size(size)
    _check_seed(seed)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")

    shape, hue_name, texture = _class_recipe(label)
    rng = np.random.default_rng([seed, index])

    background = _background(texture, size, rng)
    colour = _jittered_colour(HUES[hue_name], rng)
    alpha = _shape_mask(shape, size, rng)

    rgb = background[:, :, None] * (1.0 - alpha[:, :, None]) + colour[None, None, :] * alpha[:, :, None]
    # Mild sensor-like noise, so that no two images share exact pixel values even where the
    # geometry happens to coincide.
    rgb = rgb + rng.normal(0.0, 0.02, size=rgb.shape)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def write_toy_folder(
    out: Path,
    n: int,
    classes: int,
    size: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    block_rows: int | None = None,
) -> dict:
    """Write ``n`` toy images as ``out/<class_name>/<index:06d>.png``.

    Resumable: an index whose final PNG already exists is skipped, which is safe because its
    content is fully determined by ``(seed, index)``. Each PNG is written to ``<name>.png.partial``
    and renamed into place, so a killed run never leaves a truncated file under the final name.
    ``workers > 1`` writes blocks of PNGs in that many processes (see ``draw_toy_blocks``).

    Args:
        progress: called after every block of indices (written or skipped) with the number of
            images done so far, increasing to ``n``.

    Returns:
        summary: ``{"n", "classes", "size", "seed", "path"}`` with ``path`` the output folder as
        a string.
    """
    _check_corpus(n, classes, size, seed)
    out = Path(out)
    names = class_names(classes)
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)

    labels = toy_labels(n, classes, seed)
    rows = block_rows or block_rows_for(size)
    firsts = range(0, n, rows)
    tasks = ((out, names, first, labels[first : first + rows], classes, size, seed) for first in firsts)
    for first, count in zip(firsts, _ordered_map(_write_png_block, tasks, len(firsts), workers)):
        if progress is not None:
            progress(first + count)

    return {"n": n, "classes": classes, "size": size, "seed": seed, "path": str(out)}


def _write_png_block(
    out: Path, names: list[str], first: int, labels: np.ndarray, classes: int, size: int, seed: int
) -> int:
    """Write the block's PNGs that are not there yet; returns the block's length."""
    for offset, label in enumerate(labels.tolist()):
        index = first + offset
        final = out / toy_sample_id(names[label], index)
        if final.exists():
            continue
        image = draw_toy_image(index, label, classes, size, seed)
        partial = final.with_name(final.name + ".partial")
        # The suffix is not .png, so PIL must be told the format.
        Image.fromarray(image, mode="RGB").save(partial, format="PNG")
        os.replace(partial, final)
    return len(labels)


def _ordered_map(task: Callable, arguments: Iterable[tuple], count: int, workers: int) -> Iterator:
    """``task(*args)`` for each of ``count`` argument tuples, yielded in order.

    In-process unless ``workers > 1`` and there are at least ``_MIN_POOL_BLOCKS`` tasks; then in a
    pool of fresh ("spawn") processes, so no lock or thread of the caller (an open HDF5 file, a
    progress bar) is copied into them, with at most ``2 * workers`` tasks submitted ahead.
    """
    arguments = iter(arguments)
    if workers <= 1 or count < _MIN_POOL_BLOCKS:
        for args in arguments:
            yield task(*args)
        return
    workers = min(workers, count)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(os.getpid(),),
    )
    pending: deque[Future] = deque()
    try:
        for args in arguments:
            pending.append(pool.submit(task, *args))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # An interrupted caller (Ctrl-C, a kill of the writer) must not leave drawing processes behind.
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int) -> None:
    """Ctrl-C is the parent's to handle (it stops the pool); a worker whose parent died exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _class_recipe(label: int) -> tuple[str, str, str]:
    """(shape, hue name, texture) of a label; distinct for every label below MAX_CLASSES."""
    hue_names = list(HUES)
    return (
        SHAPES[label % len(SHAPES)],
        hue_names[label % len(hue_names)],
        TEXTURES[label % len(TEXTURES)],
    )


def _jittered_colour(hue_degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Foreground colour near the class hue: (3,) float64 in [0, 1].

    Saturation and value vary, and the hue by less than half the 60-degree spacing, so the class
    colour stays recognisable without being a constant.
    """
    hue = ((hue_degrees + rng.uniform(-12.0, 12.0)) % 360.0) / 360.0
    saturation = rng.uniform(0.65, 1.0)
    value = rng.uniform(0.7, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value))


def _background(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Grey background with the class texture at a random phase: (size, size) float64 in [0, 1].

    Grey, so that colour belongs to the shape alone; the base level varies per image.
    """
    level = rng.uniform(0.36, 0.5)
    if texture == "plain":
        return np.full((size, size), level)

    coords = (np.arange(size) + 0.5) / size  # (size,) pixel centres in [0, 1]
    y, x = np.meshgrid(coords, coords, indexing="ij")  # (size, size) each
    if texture == "noise":
        # Blotches on a coarse grid rather than per-pixel noise: per-pixel noise averages away
        # as soon as an image is downsampled, and the texture would stop telling classes apart.
        grid = rng.uniform(-1.0, 1.0, size=(int(rng.integers(5, 10)),) * 2).astype(np.float32)
        smooth = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        return level + 0.15 * np.asarray(smooth, dtype=np.float64)
    if texture == "stripes":
        angle = rng.uniform(0.0, math.pi)
        periods = rng.uniform(3.5, 6.0)  # stripes across the image
        phase = rng.uniform(0.0, 2.0 * math.pi)
        along = x * math.cos(angle) + y * math.sin(angle)
        return level + 0.15 * np.sin(2.0 * math.pi * periods * along + phase)
    if texture == "checker":
        angle = rng.uniform(-math.pi / 12, math.pi / 12)
        cells = rng.uniform(4.0, 7.0)  # cells across the image
        u = (x * math.cos(angle) - y * math.sin(angle)) * cells + rng.uniform(0.0, 2.0)
        v = (x * math.sin(angle) + y * math.cos(angle)) * cells + rng.uniform(0.0, 2.0)
        parity = (np.floor(u) + np.floor(v)) % 2.0
        return level + 0.12 * (2.0 * parity - 1.0)
    raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Antialiased coverage of one randomly placed, scaled and rotated shape.

    Returns:
        alpha: (size, size) float64 in [0, 1].
    """
    factor = max(1, min(_SUPERSAMPLE, _MAX_CANVAS // size))
    canvas = size * factor
    # Radius up to 0.3 of the side and centre offset up to 0.15 keep the shape inside the frame.
    radius = rng.uniform(0.2, 0.3) * canvas
    centre = canvas / 2.0 + rng.uniform(-0.15, 0.15, size=2) * canvas
    rotation = rng.uniform(-math.radians(25.0), math.radians(25.0))
    cos, sin = math.cos(rotation), math.sin(rotation)

    def place(points: np.ndarray) -> list[tuple[float, float]]:
        """(k, 2) unit-radius outline -> canvas coordinates for ImageDraw."""
        xy = points @ np.array([[cos, sin], [-sin, cos]]) * radius + centre
        return [tuple(p) for p in xy.tolist()]

    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    for points, fill in _unit_outlines(shape, rng):
        draw.polygon(place(points), fill=fill)
    small = mask.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float64) / 255.0


def _unit_outlines(shape: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons of a shape of radius about 1 centred at 0, painted in order with the given fill.

    Returns:
        list of ((k, 2) float64 outline, fill 255 to paint or 0 to cut out).
    """
    if shape in ("circle", "ring"):
        # A slight random ellipticity, so that rotation changes round shapes too.
        aspect = rng.uniform(0.85, 1.0)
        t = np.linspace(0.0, 2.0 * math.pi, 96, endpoint=False)
        ellipse = np.stack([np.cos(t), aspect * np.sin(t)], axis=1)
        if shape == "circle":
            return [(ellipse, 255)]
        return [(ellipse, 255), (0.55 * ellipse, 0)]
    if shape == "square":
        return [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), 255)]
    if shape == "triangle":
        t = -math.pi / 2 + np.arange(3) * 2.0 * math.pi / 3  # apex up (image y grows downwards)
        return [(1.1 * np.stack([np.cos(t), np.sin(t)], axis=1), 255)]
    if shape == "cross":
        a, w = 1.0, 0.3  # arm reach and half-width
        outline = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                   (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]  # fmt: skip
        return [(np.array(outline), 255)]
    if shape == "bars":
        bars = []
        for offset in (-0.65, 0.0, 0.65):
            x0, x1 = offset - 0.17, offset + 0.17
            bars.append((np.array([[x0, -0.95], [x1, -0.95], [x1, 0.95], [x0, 0.95]]), 255))
        return bars
    if shape == "star":
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        reach = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        return [(np.stack([reach * np.cos(t), reach * np.sin(t)], axis=1), 255)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _check_corpus(n: int, classes: int, size: int, seed: int) -> None:
    _check_classes(classes)
    if n < classes:
        raise ValueError(f"n must be at least classes ({classes}) so every class gets an image, got {n}")
    _check_size(size)
    _check_seed(seed)


def _check_classes(classes: int) -> None:
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be between 2 and {MAX_CLASSES}, got {classes}")


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")


def _check_seed(seed: int) -> None:
    # numpy's SeedSequence refuses negative entropy with a message that names neither argument.
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
