"""Jigsaw permutation sets: greedy max-min Hamming selection, and the file `ssl permutations` writes
(JSON with the set's provenance, or a bare N x grid^2 numpy array for a `.npy` name).

A permutation is a row of grid x grid cell indices (0..8 for the 3 x 3 jigsaw). Noroozi & Favaro
(2016) choose the set greedily so that permutations differ in many positions: a network that must
tell them apart cannot get away with looking at one or two tiles. Their Hamming distance is the
number of positions at which two rows differ.

Selection, over all (grid^2)! permutations (362,880 for 3 x 3, held as an int8 array):

1. start from one permutation drawn with the seeded rng;
2. keep, for every candidate, its minimum Hamming distance to the chosen set;
3. add a candidate whose minimum distance is largest (ties broken by the same rng), update the
   running minimum with one vectorised pass over the candidates, repeat.

A chosen row's running minimum is 0 and an unchosen one's at least 2 (two distinct permutations
differ in at least two positions), so no row is chosen twice. The same seed picks the same rows in
the same order, so the first k rows of a set of n > k are the set of k.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ssl_cli.errors import UserError

SCHEMA = "ssl-cli/permutations@1.0"
SUFFIXES = (".json", ".npy")
NPY_MAGIC = b"\x93NUMPY"
GRIDS = (2, 3)  # every permutation of a 4 x 4 grid (16! rows) would not fit in memory


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances.

    Args:
        a: (n, k) integer rows.
        b: (m, k) integer rows.

    Returns:
        (n, m) int64: entry (i, j) counts the positions where a[i] and b[j] differ.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"hamming_matrix needs (n, k) and (m, k) arrays, got {a.shape} and {b.shape}")
    distances = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    for position in range(a.shape[1]):  # k passes of (n, m) instead of one (n, m, k) temporary
        distances += a[:, position, None] != b[None, :, position]
    return distances


def min_pairwise_hamming(perms: np.ndarray) -> int:
    """(n, k) rows, n >= 2 -> the smallest Hamming distance between two different rows."""
    perms = np.asarray(perms)
    if perms.ndim != 2 or perms.shape[0] < 2:
        raise ValueError(f"min_pairwise_hamming needs at least two rows, got shape {perms.shape}")
    distances = hamming_matrix(perms, perms)
    np.fill_diagonal(distances, perms.shape[1] + 1)
    return int(distances.min())


def _check_grid(grid: object) -> int:
    if not isinstance(grid, int) or isinstance(grid, bool) or grid not in GRIDS:
        raise UserError(f"grid must be one of {', '.join(map(str, GRIDS))}, got {grid!r}")
    return grid


@functools.lru_cache(maxsize=len(GRIDS))
def _all_permutations(grid: int) -> np.ndarray:
    """(k, (grid^2)!) int8, one permutation per column, in lexicographic order.

    Stored position-major so that comparing every candidate with one row reads contiguous memory.
    """
    cells = grid * grid
    rows = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(cells))), dtype=np.int8)
    columns = np.ascontiguousarray(rows.reshape(-1, cells).T)
    columns.flags.writeable = False
    return columns


@functools.lru_cache(maxsize=8)
def _greedy(n: int, grid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The greedy selection, cached because every task construction (and a DataLoader's parent)
    asks for the same set. Returns (chosen (n, k) int64, reached (n,) int64) where reached[i] is
    row i's minimum distance to rows 0..i-1 at the moment it was chosen (reached[0] = k)."""
    candidates = _all_permutations(grid)
    cells, count = candidates.shape
    rng = np.random.default_rng(seed)
    chosen = np.empty(n, dtype=np.int64)
    reached = np.empty(n, dtype=np.int64)
    chosen[0], reached[0] = int(rng.integers(count)), cells
    nearest = np.full(count, cells, dtype=np.uint8)  # min distance of every candidate to the chosen set
    distance = np.empty(count, dtype=np.uint8)
    for step in range(n):
        if step > 0:
            best = int(nearest.max())
            ties = np.flatnonzero(nearest == best)
            chosen[step], reached[step] = int(ties[rng.integers(len(ties))]), best
        distance.fill(0)
        for position in range(cells):
            distance += candidates[position] != candidates[position, chosen[step]]
        np.minimum(nearest, distance, out=nearest)
    rows = np.ascontiguousarray(candidates[:, chosen].T, dtype=np.int64)
    rows.flags.writeable = False
    reached.flags.writeable = False
    return rows, reached


def select_permutations(n: int, grid: int = 3, min_hamming: int | None = None, seed: int = 0) -> np.ndarray:
    """Choose `n` permutations of the grid's cells greedily for a large minimum Hamming distance.

    Args:
        n: size of the set, 2..(grid^2)!.
        grid: 2 or 3 (cells per side).
        min_hamming: if given, fail unless every pair of chosen rows differs in at least this many
            positions.
        seed: seeds the first row and the tie-breaks.

    Returns:
        (n, grid * grid) int64, row i = permutation i (its class index in the jigsaw task).

    Raises:
        UserError: bad arguments, or the set does not reach `min_hamming`.
    """
    grid = _check_grid(grid)
    cells, total = grid * grid, math.factorial(grid * grid)
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= total:
        raise UserError(f"the number of permutations must be an integer in 2..{total} for a {grid} x {grid} grid, "
                        f"got {n!r}")
    if min_hamming is not None and (not isinstance(min_hamming, int) or isinstance(min_hamming, bool)
                                    or not 0 <= min_hamming <= cells):
        raise UserError(f"min_hamming must be an integer in 0..{cells} for a {grid} x {grid} grid, got {min_hamming!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"the permutation seed must be an integer >= 0, got {seed!r}")
    rows, reached = _greedy(n, grid, seed)
    if min_hamming is not None and int(reached.min()) < min_hamming:
        keep = int(np.argmax(reached < min_hamming))  # the first `keep` rows still reach min_hamming
        raise UserError(f"{n} permutations reach a minimum Hamming distance of only {int(reached.min())} "
                        f"(seed {seed}); at least {min_hamming} holds for the first {keep}: ask for at most "
                        f"{keep} permutations or lower min_hamming to {int(reached.min())}")
    return rows.copy()


def check_suffix(path: Path) -> Path:
    """`path` if it names a format `save_permutations` writes (.json or .npy), else a UserError."""
    if Path(path).suffix.lower() not in SUFFIXES:
        raise UserError(f"permutation file {path}: the name must end in .json (the set with its seed and minimum "
                        "Hamming distance) or .npy (a bare N x 9 numpy array)")
    return Path(path)


def save_permutations(path: Path, perms: np.ndarray, min_hamming_reached: int, seed: int) -> Path:
    """Write a set as JSON, or as a bare (n, grid * grid) int64 array when `path` ends in .npy
    (temporary name, then rename, so a reader never sees half a file)."""
    perms = np.asarray(perms)
    path = check_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".npy":
        with open(tmp, "wb") as handle:  # a handle: np.save would append .npy to the temporary name
            np.save(handle, perms.astype(np.int64), allow_pickle=False)
    else:
        document = {"schema": SCHEMA, "grid": math.isqrt(perms.shape[1]), "n": int(perms.shape[0]),
                    "min_hamming": int(min_hamming_reached), "seed": int(seed), "permutations": perms.astype(int).tolist()}
        tmp.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


def load_permutations(path: Path | str) -> np.ndarray:
    """Read a set written by `save_permutations` (JSON or .npy, told apart by content, not by name)
    -> (n, grid * grid) int64, checked row by row.

    Raises:
        UserError: naming what is wrong with the file and how to get a good one.
    """
    path = Path(path)
    fix = "write one with `ssl permutations --n N --out FILE`"
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"permutation file {path} does not exist; {fix}") from None
    except OSError as error:
        raise UserError(f"permutation file {path} is not readable ({error}); {fix}") from None
    if content.startswith(NPY_MAGIC):
        return _checked_rows(path, _npy_rows(path, content, fix), fix)
    try:
        document: Any = json.loads(content.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"permutation file {path} is not readable JSON ({error}) nor a .npy array; {fix}") from None
    if not isinstance(document, dict) or not str(document.get("schema", "")).startswith("ssl-cli/permutations@1."):
        found = document.get("schema") if isinstance(document, dict) else type(document).__name__
        raise UserError(f"permutation file {path} has schema {found!r}, expected {SCHEMA!r}; {fix}")
    rows = document.get("permutations")
    if (not isinstance(rows, list) or not rows
            or not all(isinstance(row, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in row)
                       for row in rows)):
        raise UserError(f"permutation file {path}: 'permutations' must be a non-empty list of lists of integers; {fix}")
    lengths = {len(row) for row in rows}
    grid = document.get("grid")
    if len(lengths) != 1 or grid not in GRIDS or lengths != {grid * grid}:
        raise UserError(f"permutation file {path}: every row must hold grid x grid = {grid!r} x {grid!r} cell "
                        f"indices (grid 2 or 3), found row lengths {sorted(lengths)}; {fix}")
    perms = np.asarray(rows, dtype=np.int64)
    if "n" in document and document["n"] != len(perms):
        raise UserError(f"permutation file {path} says n = {document['n']!r} but holds {len(perms)} rows; {fix}")
    return _checked_rows(path, perms, fix)


def _npy_rows(path: Path, content: bytes, fix: str) -> np.ndarray:
    """A .npy file's (n, grid * grid) integer array as int64; its grid is read from the row length."""
    try:
        perms = np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise UserError(f"permutation file {path} is not a readable .npy array ({error}); {fix}") from None
    if perms.ndim != 2 or not np.issubdtype(perms.dtype, np.integer) or perms.shape[1] not in [g * g for g in GRIDS]:
        raise UserError(f"permutation file {path} holds a {perms.dtype} array of shape {perms.shape}; expected "
                        f"integers, one row of grid x grid cell indices per permutation (N x 9, or N x 4); {fix}")
    return perms.astype(np.int64)


def _checked_rows(path: Path, perms: np.ndarray, fix: str) -> np.ndarray:
    """perms: (n, grid * grid) int64 -> the same, once every row is a distinct permutation of the cells."""
    grid = math.isqrt(perms.shape[1])
    if len(perms) < 2:
        raise UserError(f"permutation file {path} holds {len(perms)} permutation; the task needs at least 2; {fix}")
    cells = np.arange(grid * grid)
    bad = [i for i, row in enumerate(perms) if not np.array_equal(np.sort(row), cells)]
    if bad:
        raise UserError(f"permutation file {path}: row {bad[0]} {perms[bad[0]].tolist()} is not a permutation of "
                        f"0..{grid * grid - 1} ({len(bad)} bad rows); {fix}")
    unique, first = np.unique(perms, axis=0, return_index=True)
    if len(unique) != len(perms):
        repeated = sorted(set(range(len(perms))) - set(first.tolist()))
        raise UserError(f"permutation file {path}: row {repeated[0]} repeats an earlier row ({len(repeated)} "
                        f"repeats); each class needs its own permutation; {fix}")
    return perms
