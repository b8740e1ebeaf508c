"""SCAN (Van Gansbeke et al. 2020): cluster images so that each agrees with its nearest neighbours.

The parts `ssl cluster --method scan` chains (see `ssl_cli.stages.scan`):

1. neighbours: from features (N, D) of a pretext network, every image's K nearest other images by
   cosine similarity (`mine_neighbours`, in `ssl_cli.clustering.neighbours`: exact, or a faiss index
   at scale), and how often they share its class when targets exist;
2. the SCAN step: `heads` linear clustering heads (D -> k, softmax) on the standardised features of
   the frozen network, trained so that an image and one of its neighbours get the same cluster,
   minus `entropy_weight` x the entropy of the mean prediction, which keeps every cluster used
   (`ssl_cli.pretext.losses.scan.scan_loss`); the head with the lowest SCAN loss over the whole set
   (every neighbour) is kept. With the network frozen, the features of the images are computed once
   (`ssl extract`), so this step costs no forward pass of the network;
3. self-labelling: images whose weakly augmented view the head puts in a cluster with probability
   above `threshold` (0.99) become labelled by it, and the head learns those labels on a strongly
   augmented view (random resized crops and colour jitter), the cross entropy balanced over clusters
   (`self_label_loss`).

The network stays frozen (the paper also updates it, and augments the SCAN step's images): the
clusters are then a linear map of the features `ssl extract` gives for the same layer, which is how
`ssl pseudolabel` labels any other images with them, as it does with k-means centroids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ssl_cli.clustering.neighbours import mine_neighbours  # noqa: F401 (re-exported: SCAN's step 1 lives there)
from ssl_cli.pretext.losses.scan import scan_loss


def neighbour_agreement(indices: np.ndarray, targets: np.ndarray) -> float | None:
    """The fraction of (image, neighbour) pairs of the same class; None without targets (any < 0)."""
    if len(targets) == 0 or (targets < 0).any():
        return None
    return float((targets[indices] == targets[:, None]).mean())


class ClusterHeads(nn.Module):
    """`heads` linear heads on standardised features: (B, D) raw features -> list of (B, k) logits.

    The features are standardised with the training set's per-dimension mean and std (buffers, so the
    checkpoint and the clusters file carry them), as a linear probe does; SCAN's heads see the raw
    backbone output, whose scale a frozen network does not adapt to the heads."""

    def __init__(self, dim: int, k: int, heads: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", mean.float().clone() if mean is not None else torch.zeros(dim))
        self.register_buffer("std", std.float().clone() if std is not None else torch.ones(dim))
        self.heads = nn.ModuleList(nn.Linear(dim, k) for _ in range(heads))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        x = self.standardise(features)
        return [head(x) for head in self.heads]


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> per-dimension mean (D,) and std (D,), the std floored so constant dimensions stay finite."""
    return features.mean(0), features.std(0).clamp_min(1e-6)


class ImageHeads(nn.Module):
    """A frozen feature reader ((B, 3, S, S) -> (B, D), `LayerReader`) under `ClusterHeads`: images -> logits.
    The reader stays in eval mode and gets no gradient, whatever mode the module is put in."""

    def __init__(self, reader: nn.Module, heads: ClusterHeads):
        super().__init__()
        self.reader = reader.eval().requires_grad_(False)
        self.cluster_heads = heads

    def train(self, mode: bool = True) -> "ImageHeads":
        super().train(mode)
        self.reader.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            features = self.reader(images)
        return self.cluster_heads(features)


class NeighbourPairs(Dataset):
    """Items are ([features of an image, of one of its neighbours], target, position, True); the
    neighbour is drawn per (seed, epoch, position), so a resumed epoch sees the same pairs.

    features (N, D), targets (N,), neighbours (N, K) indices."""

    in_memory = True

    def __init__(self, features: torch.Tensor, targets: np.ndarray, neighbours: np.ndarray, seed: int,
                 sample_ids: np.ndarray):
        self.features, self.targets, self.neighbours = features, torch.as_tensor(targets), neighbours
        self.seed, self.epoch, self.sample_ids = seed, 0, sample_ids

    def __len__(self) -> int:
        return len(self.features)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_id(self, position: int) -> str:
        return str(self.sample_ids[position])

    def __getitem__(self, position: int):
        rng = np.random.default_rng([self.seed, self.epoch, position])
        other = int(self.neighbours[position, rng.integers(self.neighbours.shape[1])])
        return [self.features[position], self.features[other]], self.targets[position], position, True


def scan_step(entropy_weight: float):
    """The loop's step of the SCAN stage: inputs [anchors, neighbours], each (B, D) features."""

    def step(model: nn.Module, inputs: list[torch.Tensor], targets: torch.Tensor, context: Any = None):
        anchors, neighbours = inputs
        batch = len(anchors)
        logits = model(torch.cat([anchors, neighbours]))
        losses = [scan_loss(out[:batch].float(), out[batch:].float(), entropy_weight)[0] for out in logits]
        return torch.stack(losses).sum(), None

    return step


@torch.no_grad()
def head_losses(model: ClusterHeads, features: torch.Tensor, neighbours: np.ndarray,
                entropy_weight: float) -> list[float]:
    """The SCAN loss of every head over the whole set: features (N, D), every image against each of its
    neighbours (N, K); the entropy term over all N predictions."""
    index = torch.from_numpy(neighbours)
    losses = []
    for logits in model(features):
        probs = logits.float().softmax(1)  # (N, k)
        agreement = (probs[:, None, :] * probs[index]).sum(2).clamp_min(1e-7)  # (N, K)
        mean = probs.mean(0)
        entropy = -(mean * mean.clamp_min(1e-8).log()).sum()
        losses.append(float(-agreement.log().mean() - entropy_weight * entropy))
    return losses
