"""k-means backends behind one call: faiss (CPU or every visible GPU) or torch (CPU, CUDA, torchrun)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ssl_cli.clustering.result import KMeansResult
from ssl_cli.errors import UserError

if TYPE_CHECKING:
    import torch
# torch is imported where the torch backend runs: faiss's path (`ssl cluster`'s default) never loads it


def import_faiss():
    """faiss, or a UserError saying how to install it (it is an extra: one of two builds)."""
    try:
        import faiss
    except ImportError:
        raise UserError("faiss is not installed: pip install 'ssl-cli[cpu]' (faiss-cpu), or 'ssl-cli[gpu]' on a "
                        "CUDA machine; or pass --backend torch") from None
    return faiss


def faiss_gpu_count() -> int:
    faiss = import_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def use_faiss_gpu(gpu: str) -> bool:
    count = faiss_gpu_count()
    if gpu == "on" and count == 0:
        raise UserError("--gpu on asked for faiss on GPU but faiss sees no GPU; use --gpu auto or off")
    return gpu != "off" and count > 0


def train_kmeans(x: np.ndarray, k: int, niter: int, seed: int, max_points_per_centroid: int,
                 backend: str, gpu: str = "auto", device: torch.device | None = None) -> KMeansResult:
    """x: (N, d) float32 preprocessed features -> (k, d) centroids and the objective per iteration."""
    if backend == "torch":
        import torch

        from ssl_cli.clustering.kmeans_torch import kmeans_torch

        tensor = torch.from_numpy(np.ascontiguousarray(x)).to(device or "cpu")
        return kmeans_torch(tensor, k, niter, seed, max_points_per_centroid)
    faiss = import_faiss()

    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                          gpu=use_faiss_gpu(gpu), verbose=False)
    kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    return KMeansResult(centroids=np.asarray(kmeans.centroids, dtype=np.float32),
                        objective=[float(v) for v in kmeans.obj])


def faiss_training_rows(n: int, k: int, max_points_per_centroid: int, seed: int) -> np.ndarray | None:
    """The rows faiss's k-means trains on when given all `n` rows: (k * max_points_per_centroid,) int64
    row ids in the order faiss copies them (its `rand_perm(n, seed)`), or None where it trains on all.

    Gathering these rows (`train_kmeans_on_sample`) instead of handing faiss every row gives the
    same centroids without the (N, d) array and faiss's own copy of the sample next to it.
    """
    if n <= k * max_points_per_centroid:
        return None
    faiss = import_faiss()
    perm = np.empty(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
    return perm[: k * max_points_per_centroid].astype(np.int64)


def train_kmeans_on_sample(sample: np.ndarray, k: int, niter: int, seed: int, gpu: str = "auto") -> KMeansResult:
    """faiss k-means on exactly these rows, no further subsampling: sample (m, d) float32, the rows
    `faiss_training_rows` names in its order -> the centroids faiss makes from all N rows."""
    return train_kmeans(sample, k, niter, seed, -(-len(sample) // k), "faiss", gpu)


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, topk: int, backend: str,
                      device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x: (N, d), centroids: (k, d) -> (N, topk) squared distances ascending, (N, topk) int64 ids."""
    if backend == "torch":
        import torch

        from ssl_cli.clustering.kmeans_torch import assign_torch

        return assign_torch(torch.from_numpy(np.ascontiguousarray(x)).to(device or "cpu"),
                            torch.from_numpy(centroids), topk=topk)
    faiss = import_faiss()

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), topk)
    return distances.astype(np.float32), ids.astype(np.int64)
