"""Labelled images as uint8 tensors at a fixed side: the deterministic half of the data path.

Each image is loaded once, resized (short side) and centre-cropped to a square of side `stored_size`
(the training size `size` unless the training recipe takes random resized crops, see `stored_side`),
and kept as a (3, T, T) uint8 tensor. When all of them fit in `memory_budget` bytes they are held in
memory (Fashion-MNIST's 60,000 images at 32 px take 184 MB), so an epoch costs an index, not a decode.
Otherwise (ImageNet at 224 px is 190 GB) they stream: a batch of positions is read in one call
(`__getitems__`, which DataLoader workers use), from a packed store through `StoreRows` (rows copied out
of the file, no decode), from a folder by decoding each image. Both paths give the same pixels in the
same order, so a run does not depend on whether its images fitted.
Randomness lives in `BatchAugment` / `views` on the training device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate, get_worker_info
from torchvision.transforms import functional as TF

from ssl_cli.data.dataset import StoreRows, load_readable
from ssl_cli.data.sources import H5ImageSource, ImageSource

DEFAULT_MEMORY_BUDGET = 2 << 30
GREY_SAMPLE = 256  # images looked at to decide whether a set is grey
LOAD_BLOCK = 1024  # store rows read at a time when a set is loaded into memory
STORED_FACTOR = 2  # random resized crops: images kept at up to this many times the training side
SIZE_SAMPLE = 16  # folder images looked at for their size


def to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) uint8: short side resized to `size`, then centre-cropped."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = TF.center_crop(TF.resize(image, size, antialias=True), size)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def first_images(source: ImageSource, size: int, count: int = GREY_SAMPLE) -> torch.Tensor:
    """The first `count` images of a source as uint8 (n, 3, size, size), n = min(count, len(source))."""
    return torch.stack([to_uint8(source.load(i), size) for i in range(min(count, len(source)))])


def is_grey(images: torch.Tensor) -> bool:
    """uint8 (N, 3, S, S) -> True when every pixel has equal channels."""
    return bool((images[:, 0] == images[:, 1]).all() and (images[:, 1] == images[:, 2]).all())


def stored_side(source: ImageSource, size: int, crops: bool) -> int:
    """The side T the images of `source` are kept at for training at side `size`.

    Without random resized crops: `size` (what evaluation and extract see). With them, a crop must come
    from the stored image, not from a centre square already shrunk to `size`: T is the images' own side
    (the store's, Fashion-MNIST's; for a folder the smallest short side of its first SIZE_SAMPLE images),
    capped at STORED_FACTOR x `size` (a crop of a quarter of the area or more is then at full training
    resolution) and never below `size`: images at or below the training size are stored as today.
    """
    if not crops:
        return size
    native = source.native_size
    if native is None:
        sides = []
        for index in range(min(SIZE_SAMPLE, len(source))):
            try:
                sides.append(min(source.load(index).size))
            except Exception:  # an unreadable image says nothing about the others' size
                continue
        native = min(sides) if sides else size
    return max(size, min(int(native), STORED_FACTOR * size))


def row_image(pixels: np.ndarray) -> Image.Image:
    """A store row (H, W, C) uint8 -> the PIL RGB image `H5ImageSource.load` makes of it."""
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")


def rows_to_uint8(pixels: np.ndarray, size: int) -> torch.Tensor:
    """Store rows (B, H, W, C) uint8 -> (B, 3, size, size) uint8, pixel for pixel what `to_uint8` makes of
    each row loaded through `H5ImageSource.load`: rows already square at `size` with 1 or 3 channels are
    only reordered (a grey row repeated into 3 channels, as PIL's convert does), others go through PIL."""
    batch, height, width, channels = pixels.shape
    if height == width == size and channels in (1, 3):
        planes = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # numpy's copy: 3x torch's speed for uint8
        images = torch.from_numpy(planes)
        return images.expand(-1, 3, -1, -1).contiguous() if channels == 1 else images
    if batch == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.stack([to_uint8(row_image(row), size) for row in pixels])


class ItemBatch(Sequence):
    """A batch of `ResizedImages` items, already stacked: images uint8 (B, 3, T, T), labels (B,) int64,
    positions (B,) int64, ok (B,) bool. As a sequence it is the B items (image, label, position, ok), what
    `default_collate` takes; `collate_items` hands the stacked tensors on without copying them item by item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, ok: torch.Tensor):
        self.images, self.labels, self.positions, self.ok = images, labels, positions, ok

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        return self.images[slot], self.labels[slot], int(self.positions[slot]), bool(self.ok[slot])

    def stacked(self) -> "list[torch.Tensor] | PackedBatch":
        """[images, labels, positions, ok]; in a DataLoader worker, a `PackedBatch` of them."""
        if get_worker_info() is None:
            return [self.images, self.labels, self.positions, self.ok]
        return PackedBatch.pack(self.images, self.labels, self.positions, self.ok)


class PackedBatch(NamedTuple):
    """A batch as one block of shared memory, the way a DataLoader worker sends it to the training process.

    Every tensor a worker sends costs about 1 ms a batch (an allocation in shared memory, a file descriptor
    handed over through a socket, views of one storage included), as much as reading 64 images at 32 px;
    one block for the whole batch costs it once. `unpack` gives the four tensors back as views of it.
    block: uint8 (16 B + B*3*T*T + B,): labels and positions as int64 (first: 8-byte aligned), images, ok.
    """

    block: torch.Tensor
    image_shape: tuple[int, ...]

    @staticmethod
    def pack(images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, ok: torch.Tensor) -> "PackedBatch":
        batch, pixels = len(positions), images.numel()
        block = torch.empty(16 * batch + pixels + batch, dtype=torch.uint8).share_memory_()
        packed = PackedBatch(block, tuple(images.shape))
        for view, tensor in zip(packed.unpack(), (images, labels, positions, ok)):
            view.copy_(tensor)
        return packed

    def unpack(self) -> list[torch.Tensor]:
        """[images uint8 (B, 3, T, T), labels (B,) int64, positions (B,) int64, ok (B,) bool], views of the block."""
        batch, pixels = self.image_shape[0], math.prod(self.image_shape)
        meta = self.block[:16 * batch].view(torch.int64).view(2, batch)
        return [self.block[16 * batch:16 * batch + pixels].view(self.image_shape), meta[0], meta[1],
                self.block[16 * batch + pixels:].view(torch.bool)]


def collate_items(items: "ItemBatch | list") -> "list[torch.Tensor] | PackedBatch":
    """DataLoader collate_fn for `ResizedImages`: [images, labels, positions, ok] of a batch, an `ItemBatch`'s
    stacked tensors as they are, a list of items (a folder's) through `default_collate`; in a DataLoader
    worker, a `PackedBatch` of them (`unpacked` gives the four tensors back)."""
    if isinstance(items, ItemBatch):
        return items.stacked()
    batch = default_collate(items)
    return PackedBatch.pack(*batch) if get_worker_info() is not None else batch


def unpacked(batches: Iterable) -> Iterator:
    """The batches of a DataLoader, each `PackedBatch` among them unpacked into its four tensors."""
    for batch in batches:
        yield batch.unpack() if isinstance(batch, PackedBatch) else batch


class ResizedImages(Dataset):
    """Items are (uint8 image (3, T, T), label, position, ok) over `indices` of a source.

    indices (M,) int64: source rows; labels (M,) int64: their classes; T = `stored_size` (default `size`,
    the training side; larger only for recipes with random resized crops, see `stored_side`).
    `ok` is False when an unreadable image was replaced by the next readable one (counted, never fatal).
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, labels: np.ndarray, size: int,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, stored_size: int | None = None):
        self.source, self.indices, self.labels, self.size = source, np.asarray(indices), np.asarray(labels), size
        self.stored_size = int(stored_size or size)
        self.rows = StoreRows(source.path) if isinstance(source, H5ImageSource) else None
        self.cache: torch.Tensor | None = None
        self.used: np.ndarray | None = None
        if len(self.indices) * 3 * self.stored_size ** 2 <= memory_budget:
            self.cache, self.used = self.load_all()

    def load_all(self) -> tuple[torch.Tensor, np.ndarray]:
        side = self.stored_size
        cache = torch.empty((len(self.indices), 3, side, side), dtype=torch.uint8)
        if self.rows is not None:  # a store: blocks of rows, never unreadable
            for start in range(0, len(self.indices), LOAD_BLOCK):
                block = self.indices[start:start + LOAD_BLOCK]
                cache[start:start + len(block)] = rows_to_uint8(self.rows.read(block), side)
            return cache, np.arange(len(self.indices), dtype=np.int64)
        used = np.empty(len(self.indices), dtype=np.int64)
        for position in range(len(self.indices)):
            image, used[position] = load_readable(self.source, self.indices, position)
            cache[position] = to_uint8(image, side)
        return cache, used

    @property
    def in_memory(self) -> bool:
        return self.cache is not None

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reseed: augmentation is drawn per batch (`BatchAugment`)."""

    def sample_id(self, position: int) -> str:
        return self.source.sample_ids[self.indices[position]]

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, position: int) -> tuple[torch.Tensor, int]:
        """(uint8 (3, T, T), position used): image `position`, or the readable one that replaced it."""
        if self.cache is not None:
            return self.cache[position], int(self.used[position])
        if self.rows is not None:
            return rows_to_uint8(self.rows.read(self.indices[[position]]), self.stored_size)[0], position
        image, used = load_readable(self.source, self.indices, position)
        return to_uint8(image, self.stored_size), used

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        image, used = self.image(position)
        return image, torch.tensor(int(self.labels[used])), position, used == position

    def __getitems__(self, positions: Sequence[int]) -> "ItemBatch | list":
        """The items of a whole batch (what DataLoader asks for): one gather from memory, one `StoreRows.read`
        from a store, one decode per image from a folder; the same items `__getitem__` gives, in order."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.cache is not None:
            images, used = self.cache.index_select(0, torch.from_numpy(positions)), self.used[positions]
        elif self.rows is not None:
            images, used = rows_to_uint8(self.rows.read(self.indices[positions]), self.stored_size), positions
        else:
            return [self[int(position)] for position in positions]
        return ItemBatch(images, torch.from_numpy(self.labels[used].astype(np.int64)), torch.from_numpy(positions),
                         torch.from_numpy(used == positions))

    collate = staticmethod(collate_items)  # the loop's collate_fn: stacked batches pass as they are

    @property
    def read_in_threads(self) -> bool:
        """True when batches stream from a packed store: copies without decoding, which threads overlap with
        training (`dataset.threaded_batches`) at no cost of sending batches between processes."""
        return self.cache is None and self.rows is not None

    def batch(self, positions: Sequence[int]) -> list[torch.Tensor]:
        """[images uint8 (B, 3, T, T), labels (B,) int64, positions (B,) int64, ok (B,) bool] of `positions`."""
        return collate_items(self.__getitems__(positions))
