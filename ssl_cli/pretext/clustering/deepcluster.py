"""DeepCluster (Caron et al. 2018): cluster the network's features, then learn to predict the clusters.

Before every epoch, every training image goes through the current network in eval mode (no
augmentation) to its features f = body(global_pool(trunk(x))), body being the head's MLP (DeepCluster's
fc6/fc7: Linear, BN, ReLU, twice; the paper reads fc7 before its ReLU, and its top layer starts from
N(0, 0.01) where this one has PyTorch's default). The (N, hidden) features are streamed to a scratch HDF5 file in
blocks, so memory does not grow with N beyond what k-means itself needs; then the preprocessing and
k-means of `ssl cluster`: a whitening PCA (to `pca_dim`, 256 in the paper) fitted on a sample, L2
normalisation, and k-means (`backend`: faiss on every visible GPU or the CPU, or the torch backend;
`auto` picks faiss when it is installed). Clusters that the assignment leaves empty are filled as the
paper does: a non-empty cluster (drawn in proportion to its size - 1) is split in two, its centroid
copied with a small opposite perturbation and its points divided between the two along the
perturbation (the half farther along it goes to the empty cluster), so every cluster is used.

Training then samples images uniformly over clusters: N draws with replacement, each image weighing
1 / the size of its cluster (the paper's UnifLabelSampler gives every cluster an equal quota instead,
drawn without replacement inside large clusters; the expected counts are the same), and minimises the cross entropy of a linear
classifier (hidden -> k) on top of the body against the cluster ids. The classifier is re-initialised
after each re-clustering (the ids are a new, arbitrary order) and its optimizer state dropped.

The metrics file gets, per epoch, `nmi_previous` (the NMI between this epoch's and the previous
epoch's assignments: how much the labels still move), `empty_filled` and `label_seconds`. Labels,
previous labels and those figures are buffers of the head (see `clustering.base`).

Under torchrun every rank labels the whole set the same way (the same features and seeds give the
same labels with faiss); the torch k-means backend would take each rank's copy as a shard, so use
faiss there.

Options (`--task-option KEY=VALUE`): k [100: about 10x the classes of a small labelled set; the paper
used 10,000 on ImageNet], pca_dim [256, capped at the feature width and the images], hidden_dim
[max(512, trunk channels); the paper's 4096], niter [20], backend [auto | faiss | torch], sobel
[false: grey -> Sobel responses as the input], min_scale [1.0: no crop], shift [side / 14].
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ssl_cli.artifacts.h5 import H5Artifact, RowWriter
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.clustering.kmeans import nearest_centroids, train_kmeans
from ssl_cli.clustering.metrics import nmi
from ssl_cli.clustering.stream import fit_pca_streamed, reduce_streamed
from ssl_cli.errors import UserError
from ssl_cli.pretext.clustering.base import ClusteringTask, add_label_buffers, mlp_body, reset_linear
from ssl_cli.pretext.contrastive.base import check_number
from ssl_cli.pretext.heads import global_pool

BACKENDS = ("auto", "faiss", "torch")
SPLIT_EPS = 1e-4  # relative perturbation of a split centroid (faiss's CLUSTERING_EPS is 1/1024)
PCA_SAMPLE = 100_000  # rows the PCA is fitted on, as `ssl cluster --pca-sample`


class DeepClusterTask(ClusteringTask):
    name = "deepcluster"

    def __init__(self, image_size: int, k: int = 100, pca_dim: int = 256, hidden_dim: int | None = None,
                 niter: int = 20, backend: str = "auto", sobel: bool = False, min_scale: float = 1.0,
                 shift: float | None = None):
        super().__init__(image_size, sobel, min_scale, shift)
        check_number(self.name, "k", k, 2, 10_000_000, integer=True)
        check_number(self.name, "pca_dim", pca_dim, 0, 65536, integer=True)
        check_number(self.name, "niter", niter, 1, 10_000, integer=True)
        if hidden_dim is not None:
            check_number(self.name, "hidden_dim", hidden_dim, 1, 65536, integer=True)
        if backend not in BACKENDS:
            raise UserError(f"{self.name}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.k, self.pca_dim, self.hidden_dim, self.niter = k, pca_dim, hidden_dim, niter
        self.backend = resolve_backend(backend)  # recorded resolved: a resume elsewhere keeps the same k-means

    def options(self) -> dict[str, Any]:
        return {"k": self.k, "pca_dim": self.pca_dim, "hidden_dim": self.hidden_dim, "niter": self.niter,
                "backend": self.backend}

    # --- network ----------------------------------------------------------------------------------

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        head = nn.Module()
        head.body, hidden = mlp_body(trunk_shape[0], self.hidden_dim)
        head.classifier = nn.Linear(hidden, self.k)
        add_label_buffers(head, (max(1, self.size_of_dataset),))
        head.register_buffer("previous", torch.full((max(1, self.size_of_dataset),), -1, dtype=torch.int64))
        head.register_buffer("nmi_previous", torch.tensor(math.nan, dtype=torch.float64))
        head.register_buffer("empty_filled", torch.tensor(0, dtype=torch.int64))
        return head

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, k) cluster logits."""
        return head.classifier(head.body(global_pool(trunk(inputs))))

    def objective(self, head, output, target, context):
        labels = head.labels[context.indices]
        logits = output.float()
        return nn.functional.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean().item()

    # --- re-clustering ----------------------------------------------------------------------------

    def relabel(self, network: nn.Module, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        head = network.head
        device = next(network.parameters()).device
        read = lambda trunk_map: head.body(global_pool(trunk_map))  # noqa: E731
        with tempfile.TemporaryDirectory(prefix="ssl-deepcluster-") as scratch:
            x = preprocessed_features(self.embed(network, read), Path(scratch) / "features.h5",
                                      self.pca_dim, self.seed + epoch)
        backend = self.backend
        result = train_kmeans(x, self.k, self.niter, self.seed * 1_000_003 + epoch, max_points_per_centroid=256,
                              backend=backend, device=device)
        _, ids = nearest_centroids(x, result.centroids, 1, backend, device)
        labels, filled = fill_empty_clusters(x, result.centroids, ids[:, 0], np.random.default_rng([self.seed, epoch]))
        if int(head.labels[0]) >= 0:
            head.previous.copy_(head.labels)
            head.nmi_previous.fill_(nmi(head.previous.cpu().numpy(), labels))
        head.labels.copy_(torch.from_numpy(labels))
        head.empty_filled.fill_(filled)
        reset_linear(head.classifier, self.seed * 1_000_003 + epoch, optimizer)

    def sample_weights(self, head: nn.Module) -> torch.Tensor:
        """Uniform over clusters: each image weighs 1 / the size of its cluster. (N,) float64 on the CPU."""
        labels = head.labels.cpu()
        sizes = torch.bincount(labels, minlength=self.k).double()
        return 1.0 / sizes[labels]

    def epoch_end(self, network: nn.Module, epoch: int) -> dict[str, float]:
        head = network.head
        figures = {"empty_filled": float(head.empty_filled), "label_seconds": float(head.label_seconds)}
        if not math.isnan(float(head.nmi_previous)):
            figures["nmi_previous"] = float(head.nmi_previous)
        return figures


def resolve_backend(backend: str) -> str:
    """auto -> faiss when it is installed, else torch; faiss without faiss installed is a UserError."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend == "faiss":
            raise UserError("deepcluster: backend=faiss but faiss is not installed; pip install faiss-cpu "
                            "(or faiss-gpu), or use --task-option backend=torch") from None
        return "torch"
    return "faiss" if backend == "auto" else backend


def preprocessed_features(blocks, scratch: Path, pca_dim: int, seed: int) -> np.ndarray:
    """Feature blocks ((b, D) float32, in row order) -> (N, d) PCA-whitened (d = min(pca_dim, D, N - 1);
    0: no PCA) and L2-normalised float32 rows; the raw features pass through `scratch` on disk."""
    writer: RowWriter | None = None
    for block in blocks:
        if writer is None:
            writer = RowWriter.create(scratch, make_provenance("features", "deepcluster", {}, {}, []),
                                      {"features": ((block.shape[1],), np.float32), "sample_ids": ((), str)})
        writer.append(features=block, sample_ids=np.array([""] * len(block), dtype=object))
    if writer is None:
        raise UserError("deepcluster: no images to cluster")
    path = writer.commit()
    with H5Artifact(path, "features", required=("features",)) as features:
        rows, width = features["features"].shape
        dim = min(pca_dim, width, rows - 1)
        chunk = max(1024, (64 << 20) // (4 * width))
        pca = fit_pca_streamed(features, dim, PCA_SAMPLE, seed, chunk) if dim > 0 else None
        return reduce_streamed(features, pca, chunk)


def fill_empty_clusters(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                        rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Give every empty cluster half of a populated one (the paper's rule; see the module docstring).

    x (N, d), centroids (k, d), labels (N,) -> (labels (N,) with every cluster used when N >= k, the
    number of clusters filled). `centroids` is updated in place."""
    labels = labels.astype(np.int64).copy()
    k = len(centroids)
    sizes = np.bincount(labels, minlength=k)
    filled = 0
    for empty in np.flatnonzero(sizes == 0):
        weights = np.clip(sizes - 1, 0, None).astype(np.float64)
        if weights.sum() == 0:
            break  # every cluster holds one image: nothing left to split
        source = int(rng.choice(k, p=weights / weights.sum()))
        direction = rng.standard_normal(x.shape[1]).astype(np.float32)
        members = np.flatnonzero(labels == source)
        along = x[members] @ direction
        moved = members[np.argsort(along, kind="stable")[len(members) // 2:]]  # the farther half
        centroids[empty] = centroids[source] + SPLIT_EPS * direction
        centroids[source] = centroids[source] - SPLIT_EPS * direction
        labels[moved] = empty
        sizes[empty], sizes[source] = len(moved), sizes[source] - len(moved)
        filled += 1
    return labels, filled
