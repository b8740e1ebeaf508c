"""Images joined to labels by sample id, with training augmentation reproducible per (seed, epoch, index)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from ssl_cli.data.dataset import load_readable
from ssl_cli.data.sources import ImageSource
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError


def join_by_id(source: ImageSource, label_ids: np.ndarray, labels_path: str) -> np.ndarray:
    """(M,) label sample ids -> (M,) int64 source indices. Ids missing on either side are an error
    that names some of them and the counts: labels never join images by position."""
    position = {sample_id: index for index, sample_id in enumerate(source.sample_ids)}
    missing = [sample_id for sample_id in label_ids if sample_id not in position]
    labelled = set(label_ids)
    extra = [sample_id for sample_id in source.sample_ids if sample_id not in labelled]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} labelled id(s) are not images of {source.spec} (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} image(s) have no label in {labels_path} (e.g. {', '.join(extra[:3])})")
        raise UserError("; ".join(parts) + "; pseudolabel the same --data you train on")
    return np.array([position[sample_id] for sample_id in label_ids], dtype=np.int64)


def train_transform(size: int, min_scale: float, flip: bool, grayscale_prob: float, color_jitter: float) -> Callable:
    steps: list = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if color_jitter:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if grayscale_prob:
        steps.append(T.RandomGrayscale(grayscale_prob))
    steps += [T.ToTensor(), T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
    return T.Compose(steps)


class LabelledDataset(Dataset):
    """Items are (image, label, position, ok) over `indices` of a source; `ok` is False when an
    unreadable image was replaced by the next readable one (counted, never fatal)."""

    def __init__(self, source: ImageSource, indices: np.ndarray, labels: np.ndarray, transform: Callable, seed: int):
        self.source, self.indices, self.labels = source, indices, labels
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_id(self, position: int) -> str:
        return self.source.sample_ids[self.indices[position]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        image, candidate = load_readable(self.source, self.indices, position)
        # torchvision's random transforms draw from the global torch RNG: fork it and seed it per
        # sample so augmentation replays identically in any worker and after a resume.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, position)) & 0x7FFF_FFFF)
            image = self.transform(image)
        return image, torch.tensor(int(self.labels[candidate])), position, candidate == position
