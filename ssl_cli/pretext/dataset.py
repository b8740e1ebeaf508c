"""Pretext samples from an image source, built in DataLoader workers, reproducible per (seed, epoch, index)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_cli.data.sources import ImageSource, UnreadableImage
from ssl_cli.errors import UserError
from ssl_cli.pretext.base import PretextTask

# How many following images to try when one cannot be decoded, before giving up on the source.
MAX_SUBSTITUTES = 64


class PretextDataset(Dataset):
    """Items are (inputs, target, index, ok): `ok` is False when image `index` was unreadable and a
    following image stood in for it (so a broken file is counted, never fatal)."""

    def __init__(self, source: ImageSource, task: PretextTask, seed: int):
        self.source, self.task, self.seed = source, task, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_id(self, index: int) -> str:
        return self.source.sample_ids[index]

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> tuple[object, bool]:
        for offset in range(MAX_SUBSTITUTES):
            try:
                return self.source.load((index + offset) % len(self.source)), offset == 0
            except UnreadableImage:
                continue
        raise UserError(f"{MAX_SUBSTITUTES} images in a row from {self.source.sample_ids[index]} are unreadable; "
                        "check the data source")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, ok = self._load(index)
        other = self._load(int(rng.integers(len(self.source))))[0] if self.task.needs_other_image else None
        inputs, target = self.task.build_sample(image, rng, other)
        return inputs, target, index, ok
