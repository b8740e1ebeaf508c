"""A student's training set: every item is a group of one labelled image followed by `ratio`
pseudo-labelled ones, so each batch of B items holds exactly B labelled and B x ratio
pseudo-labelled images (Noisy Student's fixed labelled : unlabelled batch ratio).

An epoch has max(L, ceil(P / ratio)) groups: the pseudo-labelled images are seen once and the
labelled images cycle. Which images form which group is a permutation seeded by (seed, epoch), and
augmentation is seeded by (seed, epoch, group), so workers and resumed runs replay it exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_cli.data.dataset import load_readable
from ssl_cli.data.sources import ImageSource


class MixedDataset(Dataset):
    """Items are (images (1+r, 3, H, W), targets (1+r, C) distributions, group, ok).

    labelled_indices (L,) / labels (L,) int64: source rows and classes of the labelled images.
    pseudo_indices (P,) / pseudo_targets (P, C) float32: unlabelled source rows (repeats allowed)
        and the distributions they learn (one-hot for hard labels); P may be 0 when ratio is 0.
    """

    def __init__(self, labelled: ImageSource, labelled_indices: np.ndarray, labels: np.ndarray,
                 unlabelled: ImageSource | None, pseudo_indices: np.ndarray, pseudo_targets: np.ndarray,
                 classes: int, ratio: int, transform: Callable, seed: int):
        if ratio and not len(pseudo_indices):
            raise ValueError("a ratio of pseudo-labelled images needs at least one pseudo-labelled image")
        self.labelled, self.labelled_indices = labelled, labelled_indices
        self.labels = np.eye(classes, dtype=np.float32)[labels]
        self.unlabelled, self.pseudo_indices, self.pseudo_targets = unlabelled, pseudo_indices, pseudo_targets
        self.ratio, self.transform, self.seed = ratio, transform, seed
        self.groups = max(len(labelled_indices), -(-len(pseudo_indices) // ratio) if ratio else 0)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.labelled_order = rng.permutation(len(self.labelled_indices))
        self.pseudo_order = rng.permutation(len(self.pseudo_indices))

    def members(self, group: int) -> tuple[int, list[int]]:
        """(labelled position, pseudo positions) of one group in this epoch."""
        labelled = int(self.labelled_order[group % len(self.labelled_order)])
        pseudo = [int(self.pseudo_order[(group * self.ratio + j) % len(self.pseudo_order)]) for j in range(self.ratio)]
        return labelled, pseudo

    def sample_id(self, group: int) -> str:
        return self.labelled.sample_ids[self.labelled_indices[self.members(group)[0]]]

    def __len__(self) -> int:
        return self.groups

    def __getitem__(self, group: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        labelled, pseudo = self.members(group)
        images, targets, ok = [], [], True
        # torchvision's random transforms draw from the global torch RNG: fork and seed it per group.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, group)) & 0x7FFF_FFFF)
            image, used = load_readable(self.labelled, self.labelled_indices, labelled)
            images.append(self.transform(image))
            targets.append(self.labels[used])
            ok &= used == labelled
            for position in pseudo:
                image, used = load_readable(self.unlabelled, self.pseudo_indices, position)
                images.append(self.transform(image))
                targets.append(self.pseudo_targets[used])
                ok &= used == position
        return torch.stack(images), torch.from_numpy(np.stack(targets)), group, ok
