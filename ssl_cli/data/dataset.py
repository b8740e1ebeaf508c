"""Torch datasets over an `ImageSource` that survive unreadable images instead of crashing, and the
batched row reader of packed stores that streaming training reads through."""

from __future__ import annotations

import mmap
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_cli.artifacts.h5 import H5Artifact
from ssl_cli.data.sources import ImageSource, UnreadableImage
from ssl_cli.errors import UserError

# How many following images a training dataset tries when one cannot be decoded, before giving up.
MAX_SUBSTITUTES = 64


def load_readable(source: ImageSource, indices: Sequence[int], position: int):
    """(image, position used): image `indices[position]` of `source`, or, when it is unreadable, the
    next readable one (cyclically), so a broken file is counted by the caller, never fatal."""
    for offset in range(MAX_SUBSTITUTES):
        candidate = (position + offset) % len(indices)
        try:
            return source.load(int(indices[candidate])), candidate
        except UnreadableImage:
            continue
    raise UserError(f"{MAX_SUBSTITUTES} images in a row from {source.sample_ids[int(indices[position])]} are "
                    "unreadable; check the data source")


class SourceDataset(Dataset):
    """Items are (image tensor, index, ok). A bad image gives a zero tensor and ok=False, so the
    consumer can skip and name it; one broken file never kills a run."""

    def __init__(self, source: ImageSource, transform: Callable, indices: Sequence[int] | None = None,
                 placeholder_shape: tuple[int, ...] = (3, 32, 32)):
        self.source = source
        self.transform = transform
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.placeholder_shape = placeholder_shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, bool]:
        index = self.indices[position]
        try:
            image = self.source.load(index)
        except UnreadableImage:
            return torch.zeros(self.placeholder_shape), index, False
        return self.transform(image), index, True


# StoreRows drops its map's pages from the process after copying this much. Small, because a fault maps the
# page cache's neighbouring pages too (fault-around: 64 KiB): random 3 KB rows map ~16x the bytes copied, so
# 8 MiB copied is up to ~200 MiB resident (measured on 1.28M x 32 px rows: 16 MiB -> 359 MiB, 4 MiB -> 90).
RELEASE_BYTES = 8 * 2**20


class StoreRows:
    """Rows of a packed store's `images` (N, H, W, C) uint8, many per call, in the order asked for.

    A training batch is a few dozen rows at random places in the store. h5py's per-call overhead makes
    that slow (one read per row: 25k rows/s at 32 px; one fancy-indexed read: 3.4k), so for a store
    without filters (what `ssl pack` writes: uncompressed chunks of 64 rows) the byte offset of every
    chunk is looked up once and rows are copied out of a read-only memory map of the file (360k rows/s
    at 32 px, 220k at 96 px, from the page cache). A store with filters (compression) is read row by
    row through h5py. The file is opened lazily in whichever process reads, so forked DataLoader
    workers never share a handle.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()  # threads of one process open the file once
        self._pid = -1
        self._store: H5Artifact | None = None
        self._map: np.ndarray | None = None
        self._mmap: mmap.mmap | None = None
        self._copied = 0  # bytes copied out of the map since its pages were last released
        self._starts: np.ndarray | None = None  # (N,) int64 byte offset of every row, or None: read through h5py

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._map = self._starts = None
                self._store = H5Artifact(self.path, "images")
                self._locate(self._store["images"])
                self._pid = os.getpid()

    def _locate(self, images) -> None:
        """Sets the row shape and, where rows can be copied straight out of the file, the map and row offsets."""
        self.row_shape = tuple(images.shape[1:])
        row_bytes = int(np.prod(self.row_shape))
        if images.dtype != np.uint8 or images.id.get_create_plist().get_nfilters() or len(images) == 0:
            return
        if images.chunks is None:  # contiguous layout: one block of rows
            offset = images.id.get_offset()
            if offset is None:
                return
            starts = offset + np.arange(len(images), dtype=np.int64) * row_bytes
        else:
            if images.chunks[1:] != images.shape[1:]:
                return  # chunks that split a row: rare, read through h5py
            chunk_rows = images.chunks[0]
            chunk_starts = np.full(-(-len(images) // chunk_rows), -1, dtype=np.int64)

            def note(info) -> None:
                chunk_starts[info.chunk_offset[0] // chunk_rows] = info.byte_offset

            try:
                images.id.chunk_iter(note)
            except AttributeError:  # HDF5 before 1.12.3: one query per chunk
                for chunk in range(images.id.get_num_chunks()):
                    note(images.id.get_chunk_info(chunk))
            if (chunk_starts < 0).any():  # a chunk never written: h5py knows its fill value
                return
            rows = np.arange(len(images), dtype=np.int64)
            starts = chunk_starts[rows // chunk_rows] + (rows % chunk_rows) * row_bytes
        with open(self.path, "rb") as file:  # a plain array over the map: slicing an np.memmap costs 2 us more a row
            self._mmap = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._map = np.frombuffer(self._mmap, dtype=np.uint8)
        self._starts = starts

    def read(self, rows: Sequence[int]) -> np.ndarray:
        """rows (B,) store rows, any order, repeats allowed -> (B, H, W, C) uint8, row b = images[rows[b]]."""
        self._open()
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), dtype=np.uint8)
        if not len(rows):
            return out
        if self._starts is None:
            images = self._store["images"]
            for slot, row in enumerate(rows):
                out[slot] = images[row]
            return out
        flat, row_bytes = out.reshape(len(rows), -1), out[0].size
        for slot, start in enumerate(self._starts[rows].tolist()):
            flat[slot] = self._map[start:start + row_bytes]
        self._release(len(rows) * row_bytes)
        return out

    def _release(self, copied: int) -> None:
        """Every RELEASE_BYTES copied, the map's pages leave this process (madvise DONTNEED; the page cache
        keeps them, so the next read of a row is a minor fault). Without it every page an epoch touches counts
        in the process's resident set: 2.7 GB of file pages a third of the way through an epoch over 1.28M
        rows at 32 px, growing with N (with it: 1.7 GB of peak RSS for that whole retrain; bench/streaming.py's
        store rows still train at 1.01 of the in-memory path)."""
        self._copied += copied
        if self._copied >= RELEASE_BYTES and hasattr(mmap, "MADV_DONTNEED"):
            self._copied = 0
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def __getstate__(self) -> dict:
        return {"path": self.path, "_pid": -1, "_store": None, "_map": None, "_mmap": None, "_starts": None,
                "_copied": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


def threaded_batches(fetch: Callable[[list[int]], object], batches: Iterable[list[int]], threads: int,
                     ahead: int) -> Iterator:
    """`fetch(positions)` of every batch of positions, in order, computed by `threads` threads that keep up to
    `ahead` batches ready (threads 0: in the caller's thread, one batch at a time).

    For sources read without decoding (a packed store through `StoreRows`): the copies release the GIL, so
    threads overlap reads from disk with training as worker processes would, without the cost of sending
    each batch from another process (about 1 ms a batch, as much as reading 64 images at 32 px)."""
    if threads <= 0:
        yield from (fetch(positions) for positions in batches)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="ssl-batches")
    pending: deque = deque()
    todo = iter(batches)
    try:
        for positions in todo:
            pending.append(pool.submit(fetch, positions))
            if len(pending) >= ahead:
                break
        while pending:
            batch = pending.popleft().result()
            following = next(todo, None)
            if following is not None:
                pending.append(pool.submit(fetch, following))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
