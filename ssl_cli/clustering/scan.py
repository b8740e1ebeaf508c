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

Two ways to run steps 2 and 3. As published (`NetworkHeads`, `NeighbourImages`): the network up to the
layer read trains with the heads, on augmented images of each anchor and one of its neighbours, then on
the strong views of self-labelling; the neighbours stay those mined once from the pretext network. Or
with the network frozen (`ClusterHeads` on cached features, `NeighbourPairs`; `ImageHeads` for
self-labelling): no forward pass of the network in the SCAN step. Either way the clusters are a linear
map of the features `ssl extract` gives for the same layer of the network that came out (the trained
one, or the pretext one), which is how `ssl pseudolabel` labels any other images with them, as it does
with k-means centroids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ssl_cli.clustering.neighbours import mine_neighbours  # noqa: F401 (re-exported: SCAN's step 1 lives there)
from ssl_cli.pretext.losses.scan import CONSISTENCY_FLOOR, ENTROPY_FLOOR, scan_loss
from ssl_cli.train import distributed
from ssl_cli.train.distributed import ProcessGroup

# float32 entries of one (rows, K, k) block of neighbour predictions in `head_losses` (and of one
# (rows, max(D, k)) block in `head_probabilities`): 16 MiB, whatever N is
BLOCK_ELEMENTS = 1 << 22
AGREEMENT_BLOCK = 65536  # rows of (rows, K) class comparisons at a time in `neighbour_agreement`


def rows_per_block(per_row: int) -> int:
    """Rows of a block holding BLOCK_ELEMENTS entries at `per_row` entries a row (at least one row)."""
    return max(1, BLOCK_ELEMENTS // max(per_row, 1))


def neighbour_agreement(indices: np.ndarray, targets: np.ndarray) -> float | None:
    """The fraction of (image, neighbour) pairs of the same class; None without targets (any < 0)."""
    if len(targets) == 0 or (targets < 0).any():
        return None
    same = 0
    for start in range(0, len(indices), AGREEMENT_BLOCK):  # (block, K) comparisons, not (N, K) int64 copies
        stop = start + AGREEMENT_BLOCK
        same += int((targets[indices[start:stop]] == targets[start:stop, None]).sum())
    return same / indices.size


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


class NetworkHeads(nn.Module):
    """A feature reader that trains ((B, 3, S, S) -> (B, D), `LayerReader` over the network's own modules)
    under `ClusterHeads`: images -> list of (B, k) logits, SCAN as published. `optimizer_groups` gives the
    loop the heads at its learning rate and the reader at `backbone_lr_scale` times it."""

    def __init__(self, reader: nn.Module, heads: ClusterHeads, backbone_lr_scale: float = 1.0):
        super().__init__()
        self.reader = reader
        self.cluster_heads = heads
        self.backbone_lr_scale = backbone_lr_scale

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.cluster_heads.parameters()), "lr_scale": 1.0},  # first: the lr reported
                {"params": [p for p in self.reader.parameters() if p.requires_grad],
                 "lr_scale": self.backbone_lr_scale}]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.cluster_heads(self.reader(images))


def drawn_neighbour(neighbours: np.ndarray, seed: int, epoch: int, position: int) -> int:
    """The neighbour (a row of neighbours (N, K)) that row `position` is paired with in `epoch`: a pure
    function of (seed, epoch, position), so a resumed epoch sees the same pairs."""
    rng = np.random.default_rng([seed, epoch, position])
    return int(neighbours[position, rng.integers(neighbours.shape[1])])


class NeighbourImages(Dataset):
    """Items are ([uint8 image (3, T, T), uint8 image of one of its neighbours], target, position, ok) over
    `images` (a `ResizedImages` whose position i is row i of neighbours (N, K)); the neighbour drawn as
    `NeighbourPairs` draws it. The loop's batch transform augments both views on the device."""

    def __init__(self, images: Any, neighbours: np.ndarray, seed: int):
        self.images, self.neighbours, self.seed, self.epoch = images, neighbours, seed, 0

    @property
    def in_memory(self) -> bool:
        return bool(getattr(self.images, "in_memory", False))

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_id(self, position: int) -> str:
        return self.images.sample_id(position)

    def __getitem__(self, position: int):
        other = drawn_neighbour(self.neighbours, self.seed, self.epoch, position)
        anchor, target, _, ok = self.images[position]
        partner, _, _, partner_ok = self.images[other]
        return [anchor, partner], target, position, bool(ok and partner_ok)


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
        other = drawn_neighbour(self.neighbours, self.seed, self.epoch, position)
        return [self.features[position], self.features[other]], self.targets[position], position, True


def scan_step(entropy_weight: float):
    """The loop's step of the SCAN stage: inputs [anchors, neighbours], each (B, D) features (or (B, 3, S, S)
    images, for `NetworkHeads`).

    Under torchrun (the context's group active) the entropy term is that of the mean prediction over
    every rank's anchors (gathered with their gradients), the consistency term this rank's mean: with
    DDP averaging the gradients, W ranks of B rows each take the step one process takes on the W * B
    rows (the loop's sampler gives rank r positions r, r + W, ... of the one permutation)."""

    def step(model: nn.Module, inputs: list[torch.Tensor], targets: torch.Tensor, context: Any = None):
        anchors, neighbours = inputs
        batch = len(anchors)
        group = context.group if context is not None else ProcessGroup()
        logits = model(torch.cat([anchors, neighbours]))
        losses = []
        for out in logits:
            total, consistency, _ = scan_loss(out[:batch].float(), out[batch:].float(), entropy_weight)
            if group.active:
                probs = distributed.all_gather_with_grad(out[:batch].float().softmax(1), group)
                mean = probs.mean(0)
                total = consistency + entropy_weight * (mean * mean.clamp_min(ENTROPY_FLOOR).log()).sum()
            losses.append(total)
        return torch.stack(losses).sum(), None

    return step


@torch.no_grad()
def head_probabilities(model: ClusterHeads, head: int, features: torch.Tensor) -> torch.Tensor:
    """features (R, D) (any float dtype, any device) -> head `head`'s softmax (R, k) float32 on the model's
    device, in row blocks: one standardised (block, D) copy and one (block, k) of logits at a time."""
    device = model.mean.device
    layer = model.heads[head]
    out = torch.empty(len(features), layer.out_features, device=device)
    step = rows_per_block(max(features.shape[1], layer.out_features))
    for start in range(0, len(features), step):
        block = model.standardise(features[start : start + step].to(device))
        out[start : start + step] = layer(block).float().softmax(1)
    return out


@torch.no_grad()
def head_losses(model: ClusterHeads, features: torch.Tensor, neighbours: np.ndarray, entropy_weight: float,
                group: ProcessGroup | None = None) -> list[float]:
    """The SCAN loss of every head over the whole set: features (N, D), every image against each of its
    neighbours (N, K) int64; the entropy term that of the mean of all N predictions.

    One head at a time: its predictions (N, k) float32, then the (image, neighbour) agreements of
    blocks of rows, (block, K, k) at a time (BLOCK_ELEMENTS), summed in float64; so memory beside the
    features is one head's (N, k) predictions, whatever K. Under torchrun (`group` active) each rank
    predicts and scores its `row_share`: the predictions are gathered (a neighbour may be any row) and
    the sums all-reduced, so every rank returns the same losses."""
    group = group or ProcessGroup()
    n, per_image = neighbours.shape
    rows = distributed.row_share(n, group)
    index = torch.from_numpy(np.ascontiguousarray(neighbours)).to(model.mean.device)
    losses = []
    for head in range(len(model.heads)):
        own = head_probabilities(model, head, features[rows.start : rows.stop])  # (R, k)
        probs = distributed.gather_rows(own, n, group)  # (N, k)
        sums = torch.zeros(own.shape[1] + 1, dtype=torch.float64, device=own.device)  # sum of p, sum of log agreement
        step = rows_per_block(per_image * own.shape[1])
        for start in range(rows.start, rows.stop, step):  # float64 casts of blocks only, never of (N, k)
            stop = min(start + step, rows.stop)
            sums[:-1] += probs[start:stop].sum(0, dtype=torch.float64)
            agreement = torch.bmm(probs[index[start:stop]], probs[start:stop, :, None]).squeeze(2)  # (block, K)
            sums[-1] += agreement.clamp_min(CONSISTENCY_FLOOR).log().sum(dtype=torch.float64)
        del own, probs  # before the next head's predictions
        distributed.all_reduce_sum(sums, group)
        mean = sums[:-1] / n
        entropy = -(mean * mean.clamp_min(ENTROPY_FLOOR).log()).sum()
        losses.append(float(-sums[-1] / (n * per_image) - entropy_weight * entropy))
    return losses


@torch.no_grad()
def assign(model: ClusterHeads, features: torch.Tensor, head: int = 0,
           group: ProcessGroup | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """features (N, D) -> (assignments (N,) int64: head `head`'s argmax, confidence (N,) float32: its top
    probability, rows each rank computed), in row blocks (`head_probabilities`' (block, k) at a time, never
    (N, k)). Under torchrun (`group` active) each rank computes its `row_share` and the rows are gathered."""
    group = group or ProcessGroup()
    n = len(features)
    rows = distributed.row_share(n, group)
    device = model.mean.device
    labels = torch.empty(len(rows), dtype=torch.int64, device=device)
    confidence = torch.empty(len(rows), dtype=torch.float32, device=device)
    step = rows_per_block(max(features.shape[1], model.heads[head].out_features))
    for start in range(rows.start, rows.stop, step):
        stop = min(start + step, rows.stop)
        top = head_probabilities(model, head, features[start:stop]).max(1)
        confidence[start - rows.start : stop - rows.start] = top.values
        labels[start - rows.start : stop - rows.start] = top.indices
    shares = distributed.gather_counts(len(rows), group)
    labels, confidence = distributed.gather_rows(labels, n, group), distributed.gather_rows(confidence, n, group)
    return labels.cpu().numpy(), confidence.cpu().numpy(), shares
