"""Labelled images at the training size as uint8 tensors: the deterministic half of the data path.

Each image is loaded once, resized (short side) and centre-cropped to `size`, and kept as a
(3, size, size) uint8 tensor; when all of them fit in `memory_budget` bytes they are held in memory
(Fashion-MNIST's 60,000 images at 32 px take 184 MB), so an epoch costs an index, not a decode.
Randomness lives in `BatchAugment` on the training device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from ssl_cli.data.dataset import load_readable
from ssl_cli.data.sources import ImageSource

DEFAULT_MEMORY_BUDGET = 2 << 30
GREY_SAMPLE = 256  # images looked at to decide whether a set is grey


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


class ResizedImages(Dataset):
    """Items are (uint8 image (3, S, S), label, position, ok) over `indices` of a source.

    indices (M,) int64: source rows; labels (M,) int64: their classes.
    `ok` is False when an unreadable image was replaced by the next readable one (counted, never fatal).
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, labels: np.ndarray, size: int,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.source, self.indices, self.labels, self.size = source, np.asarray(indices), np.asarray(labels), size
        self.cache: torch.Tensor | None = None
        self.used: np.ndarray | None = None
        if len(self.indices) * 3 * size * size <= memory_budget:
            self.cache, self.used = self.load_all()

    def load_all(self) -> tuple[torch.Tensor, np.ndarray]:
        cache = torch.empty((len(self.indices), 3, self.size, self.size), dtype=torch.uint8)
        used = np.empty(len(self.indices), dtype=np.int64)
        for position in range(len(self.indices)):
            image, used[position] = load_readable(self.source, self.indices, position)
            cache[position] = to_uint8(image, self.size)
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
        """(uint8 (3, S, S), position used): image `position`, or the readable one that replaced it."""
        if self.cache is not None:
            return self.cache[position], int(self.used[position])
        image, used = load_readable(self.source, self.indices, position)
        return to_uint8(image, self.size), used

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        image, used = self.image(position)
        return image, torch.tensor(int(self.labels[used])), position, used == position
