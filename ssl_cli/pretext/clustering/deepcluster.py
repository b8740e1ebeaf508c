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

Under torchrun each rank embeds only its contiguous share of the images (`ClusteringTask.shard`), and from
the same features the labels come out as one process makes them: the PCA is fitted on the same seeded
sample of rows (each rank contributes the sampled rows it holds; they are gathered in row order and fed
to the covariance in the pieces one process reads), rank 0 fits it and sends it to every rank, each rank
reduces its own rows, and the reduced (N, d) rows are gathered (N d float32 on every rank: 1.3 GB at
1.28M x 256). Rank 0 alone then runs the k-means, the assignment and the empty-cluster rule and sends the
labels to every rank. With the torch backend the other ranks take part in its all-reduces holding no
rows, so its float64 sums are rank 0's alone, the same additions in the same order as one process's;
spread over the shards they would be grouped by rank, equal only where those sums are exact. faiss on
every rank would make W copies of the same work fight over the same GPUs. (The features themselves come from batches that start at each
share's first row; on a GPU, kernels chosen by batch shape can change their last bits.)

Options (`--task-option KEY=VALUE`): k [100: about 10x the classes of a small labelled set; the paper
used 10,000 on ImageNet], pca_dim [256, capped at the feature width and the images], hidden_dim
[max(512, trunk channels); the paper's 4096], niter [20], backend [auto | faiss | torch], sobel
[false: grey -> Sobel responses as the input], min_scale [1.0: no crop], shift [side / 14].
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ssl_cli.artifacts.h5 import H5Artifact, RowWriter
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.clustering.kmeans import nearest_centroids, train_kmeans
from ssl_cli.clustering.metrics import nmi
from ssl_cli.clustering.preprocess import PCA, CovarianceAccumulator, preprocess
from ssl_cli.errors import UserError
from ssl_cli.pretext.clustering.base import ClusteringTask, add_label_buffers, mlp_body, reset_linear
from ssl_cli.pretext.contrastive.base import check_number
from ssl_cli.pretext.heads import global_pool
from ssl_cli.train.distributed import (
    ProcessGroup,
    all_gather_rows,
    any_rank,
    broadcast_from_main,
    current_group,
)

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
        head.same_on_every_rank = ("labels", "previous")
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
        group = current_group()
        read = lambda trunk_map: head.body(global_pool(trunk_map))  # noqa: E731
        rows = self.shard(group)
        with tempfile.TemporaryDirectory(prefix="ssl-deepcluster-") as scratch:
            x = preprocessed_features(self.embed(network, read, rows), Path(scratch) / "features.h5",
                                      head.classifier.in_features, self.pca_dim, self.seed + epoch,
                                      rows, self.size_of_dataset, group, device)
        labels, filled = self.cluster(x, epoch, device, group)
        if int(head.labels[0]) >= 0:
            head.previous.copy_(head.labels)
            head.nmi_previous.fill_(nmi(head.previous.cpu().numpy(), labels))
        head.labels.copy_(torch.from_numpy(labels))
        head.empty_filled.fill_(filled)
        reset_linear(head.classifier, self.seed * 1_000_003 + epoch, optimizer)

    def cluster(self, x: np.ndarray, epoch: int, device: torch.device,
                group: ProcessGroup) -> tuple[np.ndarray, int]:
        """(N, d) preprocessed features (the same on every rank) -> (N,) int64 labels with every cluster used, and
        the number of clusters the empty-cluster rule filled; computed on rank 0, the same on every rank."""
        seed = self.seed * 1_000_003 + epoch
        if self.backend == "torch" and group.active:  # every rank joins its all-reduces; only rank 0 holds rows
            result = train_kmeans(x if group.is_main else x[:0], self.k, self.niter, seed, max_points_per_centroid=256,
                                  backend="torch", device=device)
        elif group.is_main:
            result = train_kmeans(x, self.k, self.niter, seed, max_points_per_centroid=256, backend=self.backend,
                                  device=device)
        packed = np.zeros(len(x) + 1, dtype=np.int64)  # the labels, then the count filled
        if group.is_main:
            _, ids = nearest_centroids(x, result.centroids, 1, self.backend, device)
            labels, filled = fill_empty_clusters(x, result.centroids, ids[:, 0], np.random.default_rng([self.seed, epoch]))
            packed[:-1], packed[-1] = labels, filled
        packed = broadcast_from_main(torch.from_numpy(packed), group).numpy()
        return packed[:-1], int(packed[-1])

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


def preprocessed_features(blocks: Iterable[np.ndarray], scratch: Path, width: int, pca_dim: int, seed: int,
                          rows: range | None = None, total: int | None = None, group: ProcessGroup | None = None,
                          device: torch.device | None = None) -> np.ndarray:
    """This rank's feature blocks -> (total, d) PCA-whitened (d = min(pca_dim, width, total - 1); 0: no PCA) and
    L2-normalised float32 rows of the whole set, the same on every rank.

    blocks: (b, width) float32 arrays, the rows `rows` of the `total` in order (default: all rows, one process).
    The raw rows pass through `scratch` on disk. The PCA is fitted on a sample of PCA_SAMPLE rows drawn from
    `seed` over all `total` rows and fed to the covariance in the blocks a single process reads, so the result
    does not depend on how the rows are shared among the ranks of `group` (see the module docstring). `device`
    is where a collective's tensors go under nccl; a non-finite feature on any rank is a UserError on every rank.
    """
    group = group or ProcessGroup()
    writer = RowWriter.create(scratch, make_provenance("features", "deepcluster", {}, {}, []),
                              {"features": ((width,), np.float32)})
    for block in blocks:
        writer.append(features=block)
    path = writer.commit()
    rows = rows if rows is not None else range(writer.rows_done)
    total = total if total is not None else len(rows)
    if total == 0:
        raise UserError("deepcluster: no images to cluster")
    dim = min(pca_dim, width, total - 1)
    chunk = max(1024, (64 << 20) // (4 * width))
    device = device or torch.device("cpu")
    with H5Artifact(path, "features", required=("features",)) as features:
        sample = np.zeros(total, dtype=bool)  # the rows the PCA is fitted on, drawn over the whole set
        if dim > 0:
            sample[np.random.default_rng(seed).choice(total, size=min(total, PCA_SAMPLE), replace=False)] = True
        picked = checked_rows(features, sample[rows.start:rows.stop], chunk, group, device)
        pca = None
        if dim > 0:
            gathered = all_gather_rows(torch.from_numpy(picked), group).numpy()  # (sample rows, width) in row order
            pca = pca_on_main(gathered, np.flatnonzero(sample), dim, chunk, group)
        reduced = np.empty((len(rows), dim if pca is not None else width), dtype=np.float32)
        for offset, block in features.iter_rows("features", chunk):
            reduced[offset:offset + len(block)] = preprocess(block, pca, overwrite_x=True)
    return all_gather_rows(torch.from_numpy(reduced), group).numpy()


def checked_rows(features: H5Artifact, picked: np.ndarray, chunk: int, group: ProcessGroup,
                 device: torch.device) -> np.ndarray:
    """The rows of this rank's features that `picked` ((rows,) bool) marks, as (picked rows, width) float32, read
    `chunk` rows at a time. A NaN or inf anywhere in the features of any rank is a UserError on every rank."""
    kept, finite = [], True
    for offset, block in features.iter_rows("features", chunk):
        finite = finite and bool(np.isfinite(block).all())
        kept.append(block[picked[offset:offset + len(block)]])
    if any_rank(not finite, group, device):
        raise UserError("deepcluster: the network's features hold NaN or inf, so they cannot be clustered (the "
                        "training diverged); lower --lr or add --warmup-epochs")
    return np.concatenate(kept) if kept else np.empty((0, features["features"].shape[1]), dtype=np.float32)


def pca_on_main(sample: np.ndarray, rows: np.ndarray, dim: int, chunk: int, group: ProcessGroup) -> PCA:
    """The whitening PCA (width -> dim) of `sample` ((n, width) float32, the set's rows `rows` in order), fitted by
    rank 0 and sent to every rank. The covariance takes the sample in the pieces a single process reading the
    whole set `chunk` rows at a time would give it, so the PCA is `stream.fit_pca_streamed`'s to the last bit."""
    width = sample.shape[1]
    arrays = [np.zeros(width, np.float32), np.zeros((dim, width), np.float32), np.zeros(dim, np.float32)]
    if group.is_main:
        accumulator = CovarianceAccumulator()
        for piece in np.split(sample, np.flatnonzero(np.diff(rows // chunk)) + 1):
            accumulator.update(piece)
        pca = accumulator.finalize(dim, whiten=True)
        arrays = [pca.mean, pca.components, pca.scale]
    mean, components, scale = (broadcast_from_main(torch.from_numpy(np.ascontiguousarray(array)), group).numpy()
                               for array in arrays)
    return PCA(mean, components, scale)


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
