"""A sampler whose order is a pure function of (seed, epoch), sharded by rank, that can start mid-epoch."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one rank: a seeded permutation (or `weights`-driven draws), padded so
    every rank gets the same count, rank r taking positions r, r+world, ...; `start` skips the first
    `start` indices of this rank's share (a resumed epoch)."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0,
                 shuffle: bool = True, weights: torch.Tensor | None = None):
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, epoch, rank, world
        self.start, self.shuffle, self.weights = start, shuffle, weights
        self.per_rank = -(-n // world)

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            indices = torch.multinomial(self.weights, self.per_rank * self.world, replacement=True, generator=generator)
        elif self.shuffle:
            indices = torch.randperm(self.n, generator=generator)
        else:
            indices = torch.arange(self.n)
        padding = self.per_rank * self.world - len(indices)
        if padding > 0:
            indices = torch.cat([indices, indices[:padding]])
        return indices[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)
