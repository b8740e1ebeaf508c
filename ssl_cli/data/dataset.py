"""Torch datasets over an `ImageSource` that survive unreadable images instead of crashing."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

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
