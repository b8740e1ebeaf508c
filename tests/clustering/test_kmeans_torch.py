"""Torch k-means: recovers blobs, behaves like Lloyd's algorithm, agrees with faiss and across ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import normalized_mutual_info_score

from ssl_cli.clustering.kmeans_torch import assign_torch, kmeans_torch


def _blobs(n: int = 2000, n_blobs: int = 5, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 points around well-separated centres, and (n,) blob ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim)) * 10.0
    blob = rng.integers(0, n_blobs, n)
    return (centres[blob] + rng.normal(size=(n, dim))).astype(np.float32), blob


def _gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_recovers_well_separated_blobs() -> None:
    # Random-point init can merge two blobs for an unlucky seed (faiss too); seed 0 does not.
    x, blob = _blobs()
    result = kmeans_torch(torch.from_numpy(x), k=5, niter=20, seed=0)
    assert result.centroids.shape == (5, 16) and result.centroids.dtype == np.float32
    assert len(result.objective) == 20
    _, ids = assign_torch(torch.from_numpy(x), torch.from_numpy(result.centroids), topk=1)
    assert normalized_mutual_info_score(blob, ids[:, 0]) > 0.99


def test_objective_does_not_increase() -> None:
    x = _gaussian(3000, 8, seed=1)
    result = kmeans_torch(torch.from_numpy(x), k=10, niter=15, seed=3)
    assert result.n_empty_splits == 0
    objective = np.array(result.objective)
    assert np.all(objective[1:] <= objective[:-1] * (1 + 1e-6))
    assert objective[-1] < objective[0]


def test_same_seed_same_result_and_other_seed_differs() -> None:
    x = torch.from_numpy(_gaussian(1500, 8, seed=2))
    first = kmeans_torch(x, k=8, niter=10, seed=7)
    second = kmeans_torch(x, k=8, niter=10, seed=7)
    other = kmeans_torch(x, k=8, niter=10, seed=8)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    assert first.objective == second.objective
    assert not np.array_equal(first.centroids, other.centroids)


def test_subsampling_trains_on_k_times_max_points_per_centroid() -> None:
    x = torch.from_numpy(_gaussian(3000, 4, seed=3))
    result = kmeans_torch(x, k=4, niter=3, seed=0, max_points_per_centroid=50)
    # The objective sums over the 200 training points only, so it is far below a full pass.
    full = kmeans_torch(x, k=4, niter=3, seed=0, max_points_per_centroid=10_000)
    assert result.objective[-1] < full.objective[-1] * 200 / 3000 * 1.5


def test_spherical_centroids_have_unit_norm() -> None:
    x = _gaussian(1000, 8, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    result = kmeans_torch(torch.from_numpy(x), k=6, niter=5, seed=0, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)


def test_assign_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 12)).astype(np.float32)
    centroids = rng.normal(size=(37, 12)).astype(np.float32)
    distances, ids = assign_torch(torch.from_numpy(x), torch.from_numpy(centroids), topk=3, chunk_rows=64)
    exact = ((x[:, None, :].astype(np.float64) - centroids[None, :, :]) ** 2).sum(axis=2)
    expected_ids = np.argsort(exact, axis=1)[:, :3]
    assert distances.shape == (500, 3) and distances.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(
        distances, np.take_along_axis(exact, expected_ids, axis=1), rtol=1e-4, atol=1e-4
    )
    assert np.all(np.diff(distances, axis=1) >= 0)


def test_assign_refuses_topk_above_k() -> None:
    with pytest.raises(ValueError, match="topk"):
        assign_torch(torch.zeros(4, 2), torch.zeros(2, 2), topk=3)


def test_empty_clusters_are_split_without_crashing() -> None:
    # 20 distinct points, each 5 times, and k = 60: at most 20 clusters can ever be populated.
    distinct = _gaussian(20, 6, seed=6)
    x = np.repeat(distinct, 5, axis=0)
    result = kmeans_torch(torch.from_numpy(x), k=60, niter=5, seed=0)
    assert result.centroids.shape == (60, 6)
    assert np.isfinite(result.centroids).all()
    assert result.n_empty_splits > 0
    assert np.isfinite(result.objective).all()


def test_too_few_points_is_refused() -> None:
    with pytest.raises(ValueError, match="at least k"):
        kmeans_torch(torch.zeros(3, 2), k=4, niter=1, seed=0)


def test_final_objective_close_to_faiss() -> None:
    faiss = pytest.importorskip("faiss")
    x = _gaussian(4000, 8, seed=7)
    ours = kmeans_torch(torch.from_numpy(x), k=10, niter=25, seed=1234)
    reference = faiss.Kmeans(8, 10, niter=25, seed=1234, max_points_per_centroid=256)
    reference.train(x)
    assert ours.objective[-1] == pytest.approx(reference.obj[-1], rel=0.05)


# Uneven shards, so rank offsets matter. Random-point init, like faiss's, lands in a local
# minimum (two blobs merged, one split) for many seeds; seed 0 is one that finds all five blobs.
_SHARD_SPLIT = 900
_DISTRIBUTED_CONFIGS = {
    "full": {"k": 5, "niter": 10, "seed": 0, "max_points_per_centroid": 1000},
    "subsampled": {"k": 5, "niter": 10, "seed": 0, "max_points_per_centroid": 150},
}


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, _ = _blobs()
        shard = x[:_SHARD_SPLIT] if rank == 0 else x[_SHARD_SPLIT:]
        for name, config in _DISTRIBUTED_CONFIGS.items():
            result = kmeans_torch(torch.from_numpy(shard), **config)
            np.savez(
                Path(out_dir) / f"{name}_rank{rank}.npz",
                centroids=result.centroids,
                objective=np.array(result.objective),
            )
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree_and_match_single_process(tmp_path: Path) -> None:
    mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    x, blob = _blobs()
    for name, config in _DISTRIBUTED_CONFIGS.items():
        rank0 = np.load(tmp_path / f"{name}_rank0.npz")
        rank1 = np.load(tmp_path / f"{name}_rank1.npz")
        np.testing.assert_array_equal(rank0["centroids"], rank1["centroids"])
        np.testing.assert_array_equal(rank0["objective"], rank1["objective"])

        single = kmeans_torch(torch.from_numpy(x), **config)
        # Same sample and init by construction; only the summation order of the sums differs.
        np.testing.assert_allclose(rank0["centroids"], single.centroids, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rank0["objective"], single.objective, rtol=1e-3)

        _, ids = assign_torch(torch.from_numpy(x), torch.from_numpy(rank0["centroids"]), topk=1)
        assert normalized_mutual_info_score(blob, ids[:, 0]) > 0.99
