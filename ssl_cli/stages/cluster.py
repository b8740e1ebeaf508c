"""`ssl cluster`: PCA-whitening + L2 (DeepCluster), then k-means; sizes, empties and quality stored.
`--method scan` is SCAN from a pretext checkpoint and images (`ssl_cli.stages.scan`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ssl_cli.artifacts.h5 import H5Artifact, write_arrays
from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.outputs import plan_output
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.clustering.kmeans import (
    KMeansResult,
    faiss_training_rows,
    train_kmeans,
    train_kmeans_on_sample,
    use_faiss_gpu,
)
from ssl_cli.clustering.metrics import cluster_quality
from ssl_cli.clustering.preprocess import PCA, auto_pca_dim
from ssl_cli.clustering.sharded import (
    assign_rows,
    fit_pca_sharded,
    gather_reduced_rows,
    reduce_rows,
    shard_rows,
)
from ssl_cli.clustering.stream import chunk_rows_for, pca_arrays
from ssl_cli.clustering.summary import describe_pca, summary_of
from ssl_cli.config import ClusterConfig
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.train.ranks import ProcessGroup, launched_world

if TYPE_CHECKING:
    import torch
# torch is loaded by the torch backend and under torchrun only: the faiss path in one process (the default)
# starts 1.8 s sooner and ~300 MB smaller without it (bench/scale.py's cluster row against bare faiss)

FEATURE_DATASETS = ("features", "sample_ids")


def provenance_for(cfg: ClusterConfig, features: H5Artifact) -> Provenance:
    result_config = cfg.result_config()
    if cfg.pca_dim == "auto":
        # The dimension auto resolves to is part of the result: a later change of the rule must not
        # leave an older output looking up to date. An explicit --pca-dim keeps its old fingerprint.
        result_config["pca_dim_used"] = pca_dim_for(cfg, features)
    return make_provenance("clusters", "cluster", cfg.recorded_config(), result_config,
                           [{"path": str(cfg.features), "fingerprint": features.fingerprint}])


def pca_dim_for(cfg: ClusterConfig, features: H5Artifact) -> int:
    """The PCA dimension this run uses (0 = no PCA): --pca-dim, or for auto ``auto_pca_dim`` of k,
    the rows the PCA is fitted on (min(N, --pca-sample)) and the feature dimension."""
    if cfg.pca_dim != "auto":
        return cfg.pca_dim
    rows, width = features["features"].shape
    return auto_pca_dim(cfg.k, min(rows, cfg.pca_sample), width)


def provenance(cfg: ClusterConfig) -> Provenance:
    if cfg.method == "scan":
        from ssl_cli.stages import scan  # torchvision and the training loop: not for k-means (~200 MB of RSS)

        return scan.provenance(cfg)
    with H5Artifact(cfg.features, "features", required=FEATURE_DATASETS) as features:
        return provenance_for(cfg, features)


@claim_scope()  # the output stays locked at least until run returns (see artifacts.lock)
def run(cfg: ClusterConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    if cfg.method == "scan":
        from ssl_cli.stages import scan

        return scan.run(cfg, reporter)
    with H5Artifact(cfg.features, "features", required=FEATURE_DATASETS) as features:
        provenance = provenance_for(cfg, features)
        plan = plan_output(cfg.out, provenance.fingerprint, cfg.force)
        if plan.up_to_date:
            reporter.info(f"{cfg.out} is up to date; skipped")
            return StageResult("cluster", cfg.out, plan.state.value, summary_of(cfg.out))
        n = features.rows("features")
        if cfg.k > n:
            raise UserError(f"--k {cfg.k} is larger than the {n} feature rows in {cfg.features}; use --k {n} or less")
        began = time.perf_counter()
        pca_dim = pca_dim_for(cfg, features)
        device, group = placement(cfg)
        chunk = chunk_rows_for(features, cfg.chunk_rows)
        rows = shard_rows(n, chunk, group)  # every row without torchrun
        with reporter.progress(f"preprocess (PCA-whiten to {pca_dim}, L2)" if pca_dim else "preprocess (L2)",
                               total=None):
            pca = fit_pca_sharded(features, pca_dim, cfg.pca_sample, cfg.seed, chunk, rows, group, device) \
                if pca_dim else None
        on_gpu = use_faiss_gpu(cfg.gpu) if cfg.backend == "faiss" else device.type == "cuda"
        with reporter.progress(f"k-means k={cfg.k} ({cfg.backend}{', GPU' if on_gpu else ''}"
                               f"{f', {group.world} ranks' if group.active else ''})", total=None):
            if cfg.backend == "torch":
                result, distances, assignments = kmeans_torch_sharded(cfg, features, pca, chunk, rows, group, device)
            else:
                result, distances, assignments = kmeans_faiss_streamed(cfg, features, pca, chunk)
        rank_rows = ranks_module().gather_counts(len(rows), group) if group.active else [len(rows)]
        if not group.is_main:
            ranks_module().barrier(group)  # returns once rank 0 has written cfg.out
            ranks_module().teardown(group)
            return StageResult("cluster", cfg.out, "written by rank 0", {})
        seconds = time.perf_counter() - began
        sizes = np.bincount(assignments, minlength=cfg.k)
        targets = features.array("targets") if "targets" in features else np.full(n, -1, np.int64)
        quality = cluster_quality(targets, assignments)
        sample_ids = features.strings("sample_ids")
        dim = pca_dim or int(features["features"].shape[1])
    summary = {
        "k": cfg.k, "rows": n, "dim": dim, "pca": describe_pca(pca_dim, pca is not None, cfg.pca_dim),
        "empty_clusters": int((sizes == 0).sum()),
        "objective": result.objective[-1] if result.objective else None,
        "largest_cluster": int(sizes.max()), "seconds": round(seconds, 3), "metrics": quality,
    }
    out = write_arrays(cfg.out, provenance, {
        "centroids": result.centroids, "objective": np.asarray(result.objective, np.float64),
        "cluster_sizes": sizes.astype(np.int64), "assignments": assignments,
        "distances": distances, "sample_ids": sample_ids, "targets": targets, **pca_arrays(pca),
    }, attrs={"k": cfg.k, "n_empty": summary["empty_clusters"], "n_empty_splits": result.n_empty_splits,
              "backend": cfg.backend, "gpu": bool(on_gpu), "metrics": quality or {}, "seconds": seconds,
              "ranks": group.world, "rank_rows": rank_rows, "pca_dim_used": pca_dim, "pca_whitened": pca is not None})
    if group.active:
        ranks_module().barrier(group)
        ranks_module().teardown(group)
    return StageResult("cluster", out, "written", summary)


def ranks_module():
    """ssl_cli.train.distributed (torch.distributed), loaded when a torchrun group needs it."""
    from ssl_cli.train import distributed

    return distributed


def placement(cfg: ClusterConfig) -> tuple[torch.device | None, ProcessGroup]:
    """The torch backend's device and process group (under torchrun); faiss runs in one process."""
    if cfg.backend == "faiss":
        if launched_world()[1] > 1:
            raise UserError("--backend faiss runs in one process (on every GPU of this machine); run it without "
                            "torchrun, or pass --backend torch to share the rows across torchrun ranks")
        return None, ProcessGroup()
    import torch

    from ssl_cli.device import resolve_device

    distributed = ranks_module()
    device = resolve_device(cfg.device)
    group = distributed.join(device.type)  # may follow another stage's teardown (`ssl run`)
    if group.active and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    return device, group


def kmeans_faiss_streamed(cfg: ClusterConfig, features: H5Artifact, pca: PCA | None,
                          chunk: int) -> tuple[KMeansResult, np.ndarray, np.ndarray]:
    """faiss k-means holding only its training rows: the rows faiss would sample from all N are
    gathered in one pass (reduced block by block), trained on, dropped; then every row is assigned
    block by block. The centroids are those of faiss on the whole (N, d) array.
    Returns the result, (N,) float32 squared distances and (N,) int64 assignments."""
    n = features.rows("features")
    picks = faiss_training_rows(n, cfg.k, cfg.max_points_per_centroid, cfg.seed)
    if picks is None:  # faiss trains on every row: keep them for the assignment too
        x = reduce_rows(features, pca, chunk, range(n))
        result = train_kmeans_on_sample(x, cfg.k, cfg.niter, cfg.seed, cfg.gpu)
        distances, ids = assign_rows(features, pca, chunk, range(n), result.centroids, "faiss", reduced=x)
        return result, distances, ids
    sample = gather_reduced_rows(features, pca, chunk, picks)
    result = train_kmeans_on_sample(sample, cfg.k, cfg.niter, cfg.seed, cfg.gpu)
    del sample
    distances, ids = assign_rows(features, pca, chunk, range(n), result.centroids, "faiss")
    return result, distances, ids


def kmeans_torch_sharded(cfg: ClusterConfig, features: H5Artifact, pca: PCA | None, chunk: int, rows: range,
                         group: ProcessGroup,
                         device: torch.device) -> tuple[KMeansResult, np.ndarray, np.ndarray]:
    """Torch k-means with this rank's `rows` only (sums all-reduced); each rank assigns its rows and
    every rank ends with all N (float32 distance, int64 assignment) pairs in row order."""
    import torch

    distributed = ranks_module()
    problem: UserError | None = None
    try:
        x = reduce_rows(features, pca, chunk, rows)
    except UserError as error:  # the other ranks must hear of it, not wait for this rank for ever
        problem = error
    if distributed.any_rank(problem is not None, group, device):
        distributed.teardown(group)
        raise problem or UserError(f"{features.path} has NaN or inf in rows of another torchrun rank (its message is "
                                   "above); re-extract the features or drop those images")
    result = train_kmeans(x, cfg.k, cfg.niter, cfg.seed, cfg.max_points_per_centroid, "torch", cfg.gpu, device)
    distances, ids = assign_rows(features, pca, chunk, rows, result.centroids, "torch", device, reduced=x)
    del x
    distances = distributed.all_gather_rows(torch.from_numpy(distances), group).numpy()
    ids = distributed.all_gather_rows(torch.from_numpy(ids), group).numpy()
    return result, distances, ids
