"""Pretext samples from an image source, built in DataLoader workers, reproducible per (seed, epoch, index)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ssl_cli.data.dataset import load_readable
from ssl_cli.data.sources import ImageSource


class SampleBuilder(Protocol):
    """What the dataset needs of a task (`pretext.base.PretextTask` provides it): the sample of one image."""

    needs_other_image: bool

    def build_sample(self, image: Image.Image, rng: np.random.Generator,
                     other: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


class PretextDataset(Dataset):
    """Items are (inputs, target, index, ok): `ok` is False when image `index` was unreadable and a
    following image stood in for it (so a broken file is counted, never fatal)."""

    def __init__(self, source: ImageSource, task: SampleBuilder, seed: int):
        self.source, self.task, self.seed = source, task, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_id(self, index: int) -> str:
        return self.source.sample_ids[index]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        every = range(len(self.source))
        image, used = load_readable(self.source, every, index)
        other = load_readable(self.source, every, int(rng.integers(len(self.source))))[0] \
            if self.task.needs_other_image else None
        inputs, target = self.task.build_sample(image, rng, other)
        return inputs, target, index, used == index
