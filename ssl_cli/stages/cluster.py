"""`ssl cluster`: PCA-whitening + L2 (DeepCluster), then k-means; sizes, empties and quality stored.
`--method scan` is SCAN from a pretext checkpoint and images (`ssl_cli.stages.scan`)."""

from __future__ import annotations

import time

import numpy as np
import torch

from ssl_cli.artifacts.h5 import H5Artifact, write_arrays
from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.outputs import plan_output
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.clustering.kmeans import nearest_centroids, train_kmeans, use_faiss_gpu
from ssl_cli.clustering.metrics import cluster_quality
from ssl_cli.clustering.preprocess import auto_pca_dim
from ssl_cli.clustering.stream import chunk_rows_for, fit_pca_streamed, pca_arrays, reduce_streamed
from ssl_cli.clustering.summary import describe_pca, summary_of
from ssl_cli.config import ClusterConfig
from ssl_cli.device import resolve_device
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult, scan
from ssl_cli.train import distributed

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
        return scan.provenance(cfg)
    with H5Artifact(cfg.features, "features", required=FEATURE_DATASETS) as features:
        return provenance_for(cfg, features)


@claim_scope()  # the output stays locked at least until run returns (see artifacts.lock)
def run(cfg: ClusterConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    if cfg.method == "scan":
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
        with reporter.progress(f"preprocess (PCA-whiten to {pca_dim}, L2)" if pca_dim else "preprocess (L2)",
                               total=None):
            chunk = chunk_rows_for(features, cfg.chunk_rows)
            pca = fit_pca_streamed(features, pca_dim, cfg.pca_sample, cfg.seed, chunk) if pca_dim else None
            x = reduce_streamed(features, pca, chunk)
        device = resolve_device(cfg.device) if cfg.backend == "torch" else None
        group = distributed.setup(device.type) if cfg.backend == "torch" else distributed.ProcessGroup()
        if group.active and device.type == "cuda":
            device = torch.device("cuda", group.local_rank)
        on_gpu = use_faiss_gpu(cfg.gpu) if cfg.backend == "faiss" else device.type == "cuda"
        with reporter.progress(f"k-means k={cfg.k} ({cfg.backend}{', GPU' if on_gpu else ''}"
                               f"{f', {group.world} ranks' if group.active else ''})", total=None):
            # Under torchrun each rank iterates over its own contiguous shard; sums are all-reduced.
            shard = x[group.rank * n // group.world : (group.rank + 1) * n // group.world]
            result = train_kmeans(shard, cfg.k, cfg.niter, cfg.seed, cfg.max_points_per_centroid, cfg.backend,
                                  cfg.gpu, device)
            if not group.is_main:
                distributed.barrier(group)
                distributed.teardown(group)
                return StageResult("cluster", cfg.out, "written by rank 0", {})
            distances, ids = nearest_centroids(x, result.centroids, 1, cfg.backend, device)
        seconds = time.perf_counter() - began
        assignments = ids[:, 0]
        sizes = np.bincount(assignments, minlength=cfg.k)
        targets = features.array("targets") if "targets" in features else np.full(n, -1, np.int64)
        quality = cluster_quality(targets, assignments)
        sample_ids = features.strings("sample_ids")
    summary = {
        "k": cfg.k, "rows": n, "dim": int(x.shape[1]), "pca": describe_pca(pca_dim, pca is not None, cfg.pca_dim),
        "empty_clusters": int((sizes == 0).sum()),
        "objective": result.objective[-1] if result.objective else None,
        "largest_cluster": int(sizes.max()), "seconds": round(seconds, 3), "metrics": quality,
    }
    out = write_arrays(cfg.out, provenance, {
        "centroids": result.centroids, "objective": np.asarray(result.objective, np.float64),
        "cluster_sizes": sizes.astype(np.int64), "assignments": assignments.astype(np.int64),
        "distances": distances[:, 0], "sample_ids": sample_ids, "targets": targets, **pca_arrays(pca),
    }, attrs={"k": cfg.k, "n_empty": summary["empty_clusters"], "n_empty_splits": result.n_empty_splits,
              "backend": cfg.backend, "gpu": bool(on_gpu), "metrics": quality or {}, "seconds": seconds,
              "ranks": group.world, "pca_dim_used": pca_dim, "pca_whitened": pca is not None})
    distributed.barrier(group)
    distributed.teardown(group)
    return StageResult("cluster", out, "written", summary)
