"""An online kNN monitor: how well a pre-training run's trunk features sort labelled images, while it trains.

Every `every` epochs the trunk (in eval mode) embeds a fixed set of labelled images: globally
average-pooled trunk maps, L2-normalised. Images at even positions form the memory, images at odd
positions the queries; each query takes the weighted vote of its k nearest memory images by cosine
similarity, weights exp(cos / T) (Wu et al. 2018's kNN, k=20 and T=0.07 as in the issue's protocol).
The result is kNN top-1 of the queries: no training, no labels seen by the network, seconds per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ssl_cli.data.batch_augment import BatchAugment
from ssl_cli.data.resized import ResizedImages
from ssl_cli.data.sources import ImageSource
from ssl_cli.errors import UserError

MAX_MONITOR_IMAGES = 10_000


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int, k: int,
               temperature: float) -> np.ndarray:
    """Cosine kNN: (N, D), (N,), (M, D) -> (M, C) class scores from the k nearest, weighted exp(cos/T)."""
    train_x = nn.functional.normalize(train_x, dim=1)
    test_x = nn.functional.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    out = torch.zeros(len(test_x), classes)
    for start in range(0, len(test_x), 1024):
        similarity = test_x[start : start + 1024] @ train_x.T
        top, index = similarity.topk(k, dim=1)
        out[start : start + 1024].scatter_add_(1, train_y[index], (top / temperature).exp())
    return out.numpy()


def knn_top1(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07) -> float:
    """memory (N, D), memory_labels (N,), queries (M, D), query_labels (M,) -> top-1 of the weighted cosine kNN vote."""
    classes = int(max(memory_labels.max(), query_labels.max())) + 1
    votes = knn_scores(memory.float(), memory_labels, queries.float(), classes, k, temperature)
    return float((votes.argmax(1) == query_labels.numpy()).mean())


@dataclass
class KnnMonitor:
    """Embeds `images` (uint8 (M, 3, S, S), at most MAX_MONITOR_IMAGES) with `trunk` and scores kNN top-1."""

    images: torch.Tensor
    labels: torch.Tensor
    normalise: BatchAugment  # identity augmentation: uint8 -> normalised float, as training saw it
    every: int = 1
    k: int = 20
    temperature: float = 0.07

    @classmethod
    def from_source(cls, source: ImageSource, size: int, mean, std, every: int, normalise: str = "mean_std",
                    seed: int = 0) -> "KnnMonitor":
        if not source.has_targets:
            raise UserError(f"--monitor-data {source.spec}: the monitor needs labelled images (a fashion-mnist source "
                            "or a class-per-folder image folder)")
        if every < 1:
            raise UserError(f"--monitor-every must be at least 1 epoch, got {every}")
        rows = np.flatnonzero(np.asarray(source.targets) >= 0)
        if len(rows) > MAX_MONITOR_IMAGES:  # a fixed random subset keeps each call to seconds
            rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_MONITOR_IMAGES, replace=False))
        if len(rows) < 4:
            raise UserError(f"--monitor-data {source.spec} has {len(rows)} images; the kNN monitor needs at least 4")
        labels = np.asarray(source.targets)[rows]  # aligned with rows, as ResizedImages expects
        data = ResizedImages(source, rows, labels, size, memory_budget=1 << 62)
        return cls(data.cache, torch.as_tensor(labels[data.used]),
                   BatchAugment(mean=tuple(mean), std=tuple(std), flip=False, normalise=normalise), every)

    def due(self, epoch: int, last_epoch: int) -> bool:
        """epoch counts from 1; the last epoch is always measured."""
        return epoch % self.every == 0 or epoch == last_epoch

    @torch.no_grad()
    def __call__(self, trunk: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, device: torch.device,
                 batch_size: int = 512) -> dict[str, float]:
        """{"knn_top1": ...} for `trunk` ((B, 3, S, S) -> (B, C, h, w)); `module` is put in eval mode and back."""
        was_training = module.training
        module.eval()
        try:
            features = torch.cat([trunk(self.normalise(self.images[i:i + batch_size].to(device))).float().mean(dim=(2, 3)).cpu()
                                  for i in range(0, len(self.images), batch_size)])
        finally:
            module.train(was_training)
        memory, queries = slice(0, None, 2), slice(1, None, 2)
        return {"knn_top1": knn_top1(features[memory], self.labels[memory], features[queries], self.labels[queries],
                                     self.k, self.temperature)}
