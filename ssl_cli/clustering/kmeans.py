"""k-means backends behind one call: faiss (CPU or every visible GPU) or torch (CPU, CUDA, torchrun)."""

from __future__ import annotations

import numpy as np
import torch

from ssl_cli.clustering.kmeans_torch import KMeansResult, assign_torch, kmeans_torch
from ssl_cli.errors import UserError


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
        tensor = torch.from_numpy(np.ascontiguousarray(x)).to(device or "cpu")
        return kmeans_torch(tensor, k, niter, seed, max_points_per_centroid)
    faiss = import_faiss()

    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                          gpu=use_faiss_gpu(gpu), verbose=False)
    kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    return KMeansResult(centroids=np.asarray(kmeans.centroids, dtype=np.float32),
                        objective=[float(v) for v in kmeans.obj])


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, topk: int, backend: str,
                      device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x: (N, d), centroids: (k, d) -> (N, topk) squared distances ascending, (N, topk) int64 ids."""
    if backend == "torch":
        return assign_torch(torch.from_numpy(np.ascontiguousarray(x)).to(device or "cpu"),
                            torch.from_numpy(centroids), topk=topk)
    faiss = import_faiss()

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), topk)
    return distances.astype(np.float32), ids.astype(np.int64)
