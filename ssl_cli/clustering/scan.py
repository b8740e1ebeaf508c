"""SCAN (Van Gansbeke et al. 2020): cluster images so that each agrees with its nearest neighbours.

The parts `ssl cluster --method scan` chains (see `ssl_cli.stages.scan`):

1. neighbours: from features (N, D) of a pretext network, every image's K nearest other images by
   cosine similarity (`mine_neighbours`), and how often they share its class when targets exist;
2. the SCAN step: `heads` linear clustering heads (D -> k, softmax) on the L2-normalised features of
   the frozen network, trained so that an image and one of its neighbours (both weakly augmented:
   flips and shifts) get the same cluster, minus `entropy_weight` x the entropy of the mean
   prediction, which keeps every cluster used (`ssl_cli.pretext.losses.scan.scan_loss`); the head
   with the lowest SCAN loss over the whole set (no augmentation, every neighbour) is kept;
3. self-labelling: images whose weakly augmented view the head puts in a cluster with probability
   above `threshold` (0.99) become labelled by it, and the head learns those labels on a strongly
   augmented view (random resized crops and colour jitter), the cross entropy balanced over clusters
   (`self_label_loss`).

The network stays frozen (the paper also updates it): the clusters are then a linear map of the
features `ssl extract` gives for the same layer, which is how `ssl pseudolabel` labels any other
images with them, as it does with k-means centroids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ssl_cli.data.resized import ResizedImages
from ssl_cli.data.sources import ImageSource
from ssl_cli.errors import UserError
from ssl_cli.pretext.losses.scan import scan_loss

NEIGHBOUR_BLOCK = 1024  # query rows per similarity block: (1024, N) floats at a time


def mine_neighbours(features: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> (indices (N, k) int64, cosine distances (N, k) float32), nearest first,
    each row's own image left out. Memory: one (NEIGHBOUR_BLOCK, N) block of similarities."""
    n = len(features)
    if k >= n:
        raise UserError(f"--neighbours-k {k} needs more than {k} images, the data has {n}; lower --neighbours-k")
    unit = F.normalize(features.float(), dim=1)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, NEIGHBOUR_BLOCK):
        block = unit[start : start + NEIGHBOUR_BLOCK] @ unit.T
        rows = torch.arange(start, start + len(block))
        block[torch.arange(len(block)), rows] = -float("inf")  # not its own neighbour
        top, index = block.topk(k, dim=1)
        indices[start : start + len(block)] = index.numpy()
        distances[start : start + len(block)] = (1 - top).numpy()
    return indices, distances


def neighbour_agreement(indices: np.ndarray, targets: np.ndarray) -> float | None:
    """The fraction of (image, neighbour) pairs of the same class; None without targets (any < 0)."""
    if len(targets) == 0 or (targets < 0).any():
        return None
    return float((targets[indices] == targets[:, None]).mean())


class ClusterHeads(nn.Module):
    """A frozen feature reader and `heads` linear heads: (B, 3, S, S) -> list of (B, k) logits.

    The reader ((B, 3, S, S) -> (B, D), `LayerReader`) stays in eval mode and gets no gradient, whatever
    mode the module is put in; the heads see the L2-normalised features."""

    def __init__(self, reader: nn.Module, dim: int, k: int, heads: int):
        super().__init__()
        self.reader = reader.eval().requires_grad_(False)
        self.heads = nn.ModuleList(nn.Linear(dim, k) for _ in range(heads))

    def train(self, mode: bool = True) -> "ClusterHeads":
        super().train(mode)
        self.reader.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.reader(images).float(), dim=1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.features(images)
        return [head(features) for head in self.heads]


class NeighbourPairs(ResizedImages):
    """Items are ([image, one of its neighbours] as uint8 (3, S, S) each, target, position, ok); the
    neighbour is drawn per (seed, epoch, position), so a resumed epoch sees the same pairs."""

    def __init__(self, source: ImageSource, targets: np.ndarray, neighbours: np.ndarray, size: int, seed: int):
        super().__init__(source, np.arange(len(source)), targets, size)
        self.neighbours, self.seed, self.epoch = neighbours, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, position: int):
        image, target, index, ok = super().__getitem__(position)
        rng = np.random.default_rng([self.seed, self.epoch, position])
        other = int(self.neighbours[position, rng.integers(self.neighbours.shape[1])])
        return [image, super().__getitem__(other)[0]], target, index, ok


def scan_step(entropy_weight: float):
    """The loop's step for the SCAN stage: inputs [anchors, neighbours], each (B, 3, S, S) augmented."""

    def step(model: nn.Module, inputs: list[torch.Tensor], targets: torch.Tensor, context: Any = None):
        anchors, neighbours = inputs
        batch = len(anchors)
        logits = model(torch.cat([anchors, neighbours]))
        losses = [scan_loss(out[:batch].float(), out[batch:].float(), entropy_weight)[0] for out in logits]
        return torch.stack(losses).sum(), None

    return step


@torch.no_grad()
def head_losses(heads: nn.ModuleList, features: torch.Tensor, neighbours: np.ndarray,
                entropy_weight: float) -> list[float]:
    """The SCAN loss of every head over the whole set: features (N, D) L2-normalised, every image
    against each of its neighbours (N, K); the entropy term over all N predictions."""
    index = torch.from_numpy(neighbours)
    losses = []
    for head in heads:
        probs = head(features).float().softmax(1)  # (N, k)
        agreement = (probs[:, None, :] * probs[index]).sum(2).clamp_min(1e-7)  # (N, K)
        mean = probs.mean(0)
        entropy = -(mean * mean.clamp_min(1e-8).log()).sum()
        losses.append(float(-agreement.log().mean() - entropy_weight * entropy))
    return losses
