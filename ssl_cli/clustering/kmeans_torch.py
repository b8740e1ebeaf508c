"""Lloyd's k-means in torch, written like faiss's ``Clustering`` so the two backends agree.

Distances come from matrix products (||x||^2 - 2 x.c + ||c||^2) evaluated over blocks of rows, so
memory stays bounded for 1.3M points and k = 2000 on either CPU or CUDA. Under torch.distributed
each rank holds a shard of the points; per-iteration sums, counts and objective are all-reduced,
so every rank ends with identical centroids. Random choices (training subsample, initial centroids,
empty-cluster splits) are drawn over the *global* row order from one generator seeded with
``seed`` on every rank, which makes a run on W shards (concatenated in rank order) pick the same
points as a single-process run on all rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ssl_cli.clustering.result import KMeansResult  # re-exported (__all__)

__all__ = ["KMeansResult", "assign_torch", "kmeans_torch"]

# Upper bound on the floats in one (rows, k) distance block or one (rows, d) feature block:
# 64M float32 = 256 MiB, small next to an accelerator's memory and fine on a host.
_BLOCK_FLOATS = 64 * 2**20

# Relative perturbation that separates a split centroid from its copy; faiss's value.
_SPLIT_EPS = 1.0 / 1024.0




def _process_group() -> tuple[int, int]:
    """(rank, world size), or (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _shard_sizes(n_local: int, device: torch.device) -> list[int]:
    """Rows held by every rank, in rank order."""
    _, world = _process_group()
    if world == 1:
        return [n_local]
    local = torch.tensor([n_local], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return [int(t.item()) for t in gathered]


def _block_rows(k: int, d: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        return chunk_rows
    return max(1, _BLOCK_FLOATS // max(k, d))


def _nearest(
    block: torch.Tensor, centroids: torch.Tensor, centroid_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row.

    block: (m, d) float32; centroids: (k, d) float32; centroid_norms: (k,) = ||c||^2.
    Returns (m,) float32 squared distances and (m,) int64 centroid ids.
    """
    # ||c||^2 - 2 x.c in one fused product; ||x||^2 does not change the argmin so is added after.
    scores = torch.addmm(centroid_norms, block, centroids.T, alpha=-2.0)
    best, ids = scores.min(dim=1)
    # The expansion can go slightly negative through cancellation; a squared distance cannot.
    distances = (best + (block * block).sum(dim=1)).clamp_(min=0.0)
    return distances, ids


def _global_rows_to_local(chosen: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Positions in ``chosen`` (global row ids) owned by ``rank``, as a bool mask."""
    offset = sum(sizes[:rank])
    return (chosen >= offset) & (chosen < offset + sizes[rank])


def _training_rows(
    x: torch.Tensor, sizes: list[int], rank: int, n_train: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[int]]:
    """Random subsample of n_train rows over all shards, like faiss's subsampling.

    x: (n_local, d) this rank's shard. Returns this rank's (n_local_train, d) part of the sample
    and the per-rank sample sizes. Kept rows stay in their original order, so the concatenation
    over ranks is the same sample a single process would draw from all rows.
    """
    chosen = torch.randperm(sum(sizes), generator=generator)[:n_train]
    offsets = np.cumsum([0, *sizes])
    train_sizes = [int(((chosen >= offsets[r]) & (chosen < offsets[r + 1])).sum()) for r in range(len(sizes))]
    mine = chosen[_global_rows_to_local(chosen, sizes, rank)] - int(offsets[rank])
    local_rows = torch.sort(mine).values.to(x.device)
    return x[local_rows], train_sizes


def _initial_centroids(
    x_train: torch.Tensor, train_sizes: list[int], rank: int, k: int, generator: torch.Generator
) -> torch.Tensor:
    """k distinct training points picked uniformly over all ranks. Returns (k, d) float32.

    Each rank writes the picked rows it owns into a zero matrix and a SUM all-reduce assembles
    the full set (adding exact zeros keeps the values bit-identical on every rank).
    """
    chosen = torch.randperm(sum(train_sizes), generator=generator)[:k]
    owned = _global_rows_to_local(chosen, train_sizes, rank)
    centroids = torch.zeros((k, x_train.shape[1]), dtype=torch.float32, device=x_train.device)
    local_rows = (chosen[owned] - sum(train_sizes[:rank])).to(x_train.device)
    centroids[owned.to(x_train.device)] = x_train[local_rows]
    _all_reduce_sum(centroids)
    return centroids


def _split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> int:
    """Re-seed every empty cluster by splitting a populated one, in place; faiss's strategy.

    centroids: (k, d) float32 (any device); counts: (k,) float64 on CPU, updated in place.
    The cluster to split is drawn with probability proportional to (size - 1), so big clusters
    get split and singletons never are; the copy and the original are pushed apart by a small
    relative perturbation of opposite sign, and the count is shared between them. Every rank
    sees the same counts and the same generator state, so the splits agree across ranks.
    Returns the number of splits.
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return 0
    d = centroids.shape[1]
    # +eps on even coordinates and -eps on odd ones for the copy, the opposite for the original.
    pattern = torch.ones(d, dtype=torch.float32, device=centroids.device)
    pattern[1::2] = -1.0
    for target in empty:
        weights = (counts - 1.0).clamp(min=0.0)
        if weights.sum() <= 0:
            # Only after repeated halving of tiny clusters; fall back to plain proportional sizes.
            weights = counts.clone()
        source = int(torch.multinomial(weights, 1, generator=generator).item())
        base = centroids[source].clone()
        centroids[target] = base * (1.0 + _SPLIT_EPS * pattern)
        centroids[source] = base * (1.0 - _SPLIT_EPS * pattern)
        counts[target] = counts[source] / 2.0
        counts[source] -= counts[target]
    return len(empty)


def _normalize_rows(centroids: torch.Tensor) -> torch.Tensor:
    norms = centroids.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, centroids / norms.clamp(min=1e-30), centroids)


def kmeans_torch(
    x: torch.Tensor,
    k: int,
    niter: int,
    seed: int,
    max_points_per_centroid: int = 256,
    spherical: bool = False,
) -> KMeansResult:
    """Lloyd's k-means with faiss's subsampling, random-point init and empty-cluster splitting.

    x: (N, d) float32 on CPU or CUDA -- this rank's shard when a process group is running,
        otherwise all points. Every rank must call with the same k, niter, seed and options.
    k: number of centroids, at most the total number of points.
    niter: Lloyd iterations (assignment + update); 0 returns the initial centroids.
    seed: seeds the subsample, the initial centroids and the cluster splits.
    max_points_per_centroid: train on a random k * max_points_per_centroid points when there
        are more, as faiss does (the sample is drawn over all ranks together).
    spherical: renormalise centroids to unit norm after each update (for L2-normalised inputs).
    Returns a ``KMeansResult`` with (k, d) float32 centroids, identical on every rank.

    Deterministic for a seed on CPU; on CUDA the scatter-add of the centroid sums uses atomics,
    so the last bits (and, at exact ties, an assignment) can vary between runs.
    """
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"k-means expects a 2-D (points, dim) tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be at least 1, got {max_points_per_centroid}")
    x = x.to(torch.float32)
    rank, _ = _process_group()
    sizes = _shard_sizes(x.shape[0], x.device)
    n_total = sum(sizes)
    if n_total < k:
        raise ValueError(f"k-means needs at least k = {k} points, got {n_total}; lower k")

    # One CPU generator, consumed identically on every rank, drives every random choice.
    generator = torch.Generator().manual_seed(seed)
    n_train = k * max_points_per_centroid
    if n_total > n_train:
        x_train, train_sizes = _training_rows(x, sizes, rank, n_train, generator)
    else:
        x_train, train_sizes = x, sizes
    x_train = x_train.contiguous()

    centroids = _initial_centroids(x_train, train_sizes, rank, k, generator)
    if spherical:
        centroids = _normalize_rows(centroids)

    d = x.shape[1]
    rows = _block_rows(k, d, None)
    objective: list[float] = []
    n_splits = 0
    for _ in range(niter):
        # Sums, counts and objective share one float64 buffer: one all-reduce per iteration, and
        # float64 so that adding millions of points does not lose the low bits.
        totals = torch.zeros(k * d + k + 1, dtype=torch.float64, device=x.device)
        sums, counts, inertia = totals[: k * d].view(k, d), totals[k * d : -1], totals[-1:]
        centroid_norms = (centroids * centroids).sum(dim=1)
        for block in x_train.split(rows):
            distances, ids = _nearest(block, centroids, centroid_norms)
            # Each point is added in float64, in row order: a float32 sum per block would round
            # differently wherever the blocks begin, so W shards would not give one process's centroids.
            sums.index_add_(0, ids, block.to(torch.float64))
            counts += torch.bincount(ids, minlength=k)
            inertia += distances.sum(dtype=torch.float64)
        _all_reduce_sum(totals)
        objective.append(float(inertia.item()))

        centroids = (sums / counts.clamp(min=1.0)[:, None]).to(torch.float32)
        n_splits += _split_empty_clusters(centroids, counts.cpu(), generator)
        if spherical:
            centroids = _normalize_rows(centroids)

    return KMeansResult(
        centroids=centroids.cpu().numpy().astype(np.float32, copy=False),
        objective=objective,
        n_empty_splits=n_splits,
    )


def assign_torch(
    x: torch.Tensor, centroids: torch.Tensor, topk: int = 2, chunk_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The topk nearest centroids of every point, by squared Euclidean distance.

    x: (N, d) points on CPU or CUDA; centroids: (k, d), moved to x's device.
    topk: neighbours per point, 1 <= topk <= k. chunk_rows: rows per block (default keeps a
        (rows, k) block near 64M floats).
    Returns (N, topk) float32 squared distances, ascending, and (N, topk) int64 centroid ids.
    """
    x = torch.as_tensor(x)
    centroids = torch.as_tensor(centroids).to(device=x.device, dtype=torch.float32)
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"points {tuple(x.shape)} and centroids {tuple(centroids.shape)} must be 2-D with the same dim"
        )
    k = centroids.shape[0]
    if not 1 <= topk <= k:
        raise ValueError(f"topk must be between 1 and the number of centroids ({k}), got {topk}")
    n = x.shape[0]
    distances = np.empty((n, topk), dtype=np.float32)
    ids = np.empty((n, topk), dtype=np.int64)
    centroid_norms = (centroids * centroids).sum(dim=1)
    rows = _block_rows(k, x.shape[1], chunk_rows)
    for start in range(0, n, rows):
        block = x[start : start + rows].to(torch.float32)
        scores = torch.addmm(centroid_norms, block, centroids.T, alpha=-2.0)
        best, best_ids = scores.topk(topk, dim=1, largest=False, sorted=True)
        best = (best + (block * block).sum(dim=1, keepdim=True)).clamp_(min=0.0)
        distances[start : start + block.shape[0]] = best.cpu().numpy()
        ids[start : start + block.shape[0]] = best_ids.cpu().numpy()
    return distances, ids
