"""A student's training set: every item is a group of one labelled image followed by `ratio`
pseudo-labelled ones, so each batch of B items holds exactly B labelled and B x ratio
pseudo-labelled images (Noisy Student's fixed labelled : unlabelled batch ratio).

An epoch has max(L, ceil(P / ratio)) groups: the pseudo-labelled images are seen once and the
labelled images cycle. Which images form which group is a permutation seeded by (seed, epoch). Items
are the images at the training size, uint8, held in memory when they fit (`data.resized`): the
noise (RandAugment, crops, shifts, flips) is drawn per batch on the device, seeded by the step, so
workers and resumed runs replay it exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_cli.data.resized import DEFAULT_MEMORY_BUDGET, ResizedImages
from ssl_cli.data.sources import ImageSource


class MixedDataset(Dataset):
    """Items are (uint8 images (1+r, 3, S, S), targets (1+r, C) distributions, group, ok).

    labelled_indices (L,) / labels (L,) int64: source rows and classes of the labelled images.
    pseudo_indices (P,) / pseudo_targets (P, C) float32: unlabelled source rows (repeats allowed)
        and the distributions they learn (one-hot for hard labels); P may be 0 when ratio is 0.
    size: the training side S; memory_budget: bytes the decoded images may take in memory (split
        between the labelled and the pseudo-labelled ones; beyond it they are decoded per item).
    """

    def __init__(self, labelled: ImageSource, labelled_indices: np.ndarray, labels: np.ndarray,
                 unlabelled: ImageSource | None, pseudo_indices: np.ndarray, pseudo_targets: np.ndarray,
                 classes: int, ratio: int, size: int, seed: int, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        if ratio and not len(pseudo_indices):
            raise ValueError("a ratio of pseudo-labelled images needs at least one pseudo-labelled image")
        self.labelled, self.labelled_indices = labelled, labelled_indices
        self.labels = torch.eye(classes)[torch.as_tensor(labels, dtype=torch.int64)]  # (L, C) one-hot
        self.unlabelled, self.pseudo_indices = unlabelled, pseudo_indices
        self.pseudo_targets = torch.tensor(np.asarray(pseudo_targets, dtype=np.float32).reshape(len(pseudo_indices), classes))
        self.ratio, self.seed = ratio, seed
        self.labelled_images = ResizedImages(labelled, labelled_indices, labels, size, memory_budget // 2)
        self.pseudo_images = ResizedImages(unlabelled, pseudo_indices, np.zeros(len(pseudo_indices), np.int64), size,
                                           memory_budget // 2) if ratio else None
        self.groups = max(len(labelled_indices), -(-len(pseudo_indices) // ratio) if ratio else 0)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.labelled_order = rng.permutation(len(self.labelled_indices)).tolist()  # lists: an item indexes them
        self.pseudo_order = rng.permutation(len(self.pseudo_indices)).tolist()

    def members(self, group: int) -> tuple[int, list[int]]:
        """(labelled position, pseudo positions) of one group in this epoch."""
        labelled = self.labelled_order[group % len(self.labelled_order)]
        pseudo = [self.pseudo_order[(group * self.ratio + j) % len(self.pseudo_order)] for j in range(self.ratio)]
        return labelled, pseudo

    @property
    def in_memory(self) -> bool:
        """Every image decoded already: the loop then indexes in its own process, without workers."""
        return self.labelled_images.in_memory and (self.pseudo_images is None or self.pseudo_images.in_memory)

    def sample_id(self, group: int) -> str:
        return self.labelled.sample_ids[self.labelled_indices[self.members(group)[0]]]

    def __len__(self) -> int:
        return self.groups

    def __getitem__(self, group: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        labelled, pseudo = self.members(group)
        image, used = self.labelled_images.image(labelled)
        if not pseudo:  # a group of one (round 0): views; the loader's collate makes the only copy
            return image.unsqueeze(0), self.labels[used:used + 1], group, used == labelled
        images, targets, ok = [image], [self.labels[used]], used == labelled
        for position in pseudo:
            image, used = self.pseudo_images.image(position)
            images.append(image)
            targets.append(self.pseudo_targets[used])
            ok &= used == position
        return torch.stack(images), torch.stack(targets), group, ok
