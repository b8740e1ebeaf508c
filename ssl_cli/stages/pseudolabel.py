"""`ssl pseudolabel`: nearest centroid after the clusters' own preprocessing, streamed in chunks.

The features may come from another dataset than the one clustered (Noroozi et al. label one set
with clusters found on another); only the feature dimension has to match. Clusters of
`ssl cluster --method scan` carry a head instead of centroids: a row's label is the head's top class on
its standardised features, its distance 1 - that probability and its confidence the probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssl_cli.artifacts.h5 import H5Artifact, RowWriter
from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.outputs import OutputState, plan_output
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.clustering.kmeans import nearest_centroids
from ssl_cli.clustering.metrics import cluster_quality
from ssl_cli.clustering.stream import check_finite, chunk_rows_for, pca_from_artifact, preprocessed_blocks
from ssl_cli.config import PseudolabelConfig
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.stages.cluster import FEATURE_DATASETS

COLUMNS = {"sample_ids": ((), str), "labels": ((), np.int64), "distance": ((), np.float32),
           "confidence": ((), np.float32), "targets": ((), np.int64)}


@claim_scope()  # the output stays locked at least until run returns (see artifacts.lock)
def run(cfg: PseudolabelConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    with H5Artifact(cfg.clusters, "clusters") as clusters, \
            H5Artifact(cfg.features, "features", required=FEATURE_DATASETS) as features:
        centroids = cluster_model(clusters)
        pca = pca_from_artifact(clusters)
        check_dimensions(features, clusters, centroids, pca)
        provenance = provenance_for(cfg, clusters, features)
        chunk = chunk_rows_for(features, cfg.chunk_rows)
        plan = plan_output(cfg.out, provenance.fingerprint, cfg.force)
        if plan.up_to_date:
            reporter.info(f"{cfg.out} is up to date; skipped")
            return StageResult("pseudolabel", cfg.out, plan.state.value, summary_of(cfg.out))
        writer = RowWriter.resume(cfg.out, provenance.fingerprint) if plan.state is OutputState.RESUME else None
        resumed = writer is not None
        if writer is None:
            writer = RowWriter.create(cfg.out, provenance, COLUMNS, chunk_rows=min(chunk, 65536))
            writer.set_attrs(k=len(centroids), classes=features.attrs.get("classes", "[]"))
        try:
            label_rows(features, centroids, pca, writer, chunk, reporter)
        except UserError:
            writer.discard()  # bad input fails the same way on every re-run: nothing to resume
            raise
        except BaseException:
            writer.close()
            raise
        labels, targets = writer.handle["labels"][...], writer.handle["targets"][...]
        quality = cluster_quality(targets, labels)
        writer.set_attrs(metrics=quality or {})
        rows = writer.rows_done
        writer.commit()
    summary = {"rows": rows, "k": len(centroids), "used_clusters": int(np.count_nonzero(np.bincount(labels, minlength=len(centroids)))),
               "metrics": quality, "resumed": resumed}
    return StageResult("pseudolabel", cfg.out, "resumed" if resumed else "written", summary)


def provenance_for(cfg: PseudolabelConfig, clusters: H5Artifact, features: H5Artifact) -> Provenance:
    return make_provenance(
        "labels", "pseudolabel", cfg.recorded_config(), cfg.result_config(),
        [{"path": str(cfg.clusters), "fingerprint": clusters.fingerprint},
         {"path": str(cfg.features), "fingerprint": features.fingerprint}])


def provenance(cfg: PseudolabelConfig) -> Provenance:
    with H5Artifact(cfg.clusters, "clusters") as clusters, \
            H5Artifact(cfg.features, "features", required=FEATURE_DATASETS) as features:
        return provenance_for(cfg, clusters, features)


@dataclass(frozen=True)
class ScanHead:
    """SCAN's clustering head: weight (k, D), bias (k,) on features standardised with mean (D,) and std (D,);
    sized like the (k, D) centroids it stands for."""

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    def __len__(self) -> int:
        return len(self.weight)


def cluster_model(clusters: H5Artifact) -> "np.ndarray | ScanHead":
    """k-means centroids (k, D), or a SCAN head."""
    if "head_weight" in clusters:
        return ScanHead(*(clusters.array(name).astype(np.float32)
                          for name in ("head_weight", "head_bias", "feature_mean", "feature_std")))
    if "centroids" not in clusters:
        raise UserError(f"{clusters.path} has neither centroids (k-means) nor a head (scan); the file is damaged, "
                        "recompute it with `ssl cluster`")
    return clusters.array("centroids").astype(np.float32)


def head_labels(block: np.ndarray, head: ScanHead) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(b, D) features -> (labels, distances 1 - p, confidence p) of SCAN's head on the standardised rows."""
    import torch

    x = torch.from_numpy((np.asarray(block, dtype=np.float32) - head.mean) / head.std)
    probs = (x @ torch.from_numpy(head.weight).T + torch.from_numpy(head.bias)).softmax(1)
    top, labels = probs.max(1)
    return labels.numpy().astype(np.int64), (1 - top).numpy().astype(np.float32), top.numpy().astype(np.float32)


def check_dimensions(features: H5Artifact, clusters: H5Artifact, centroids: np.ndarray, pca) -> None:
    width = features["features"].shape[1]
    expected = pca.dim_in if pca is not None else centroids.shape[1]
    if width != expected:
        raise UserError(f"{features.path} has {width}-d features but {clusters.path} was fitted on {expected}-d "
                        "features; extract the same layer (and pooling) that was clustered")


def label_rows(features: H5Artifact, centroids: np.ndarray, pca, writer: RowWriter, chunk_rows: int,
               reporter: Reporter) -> None:
    """Label rows from `writer.rows_done` on; each chunk is appended whole, so a kill resumes cleanly."""
    n = features.rows("features")
    targets = features["targets"] if "targets" in features else None
    # The ids go from file to file as the UTF-8 bytes HDF5 holds: decoding and re-encoding them
    # cost as much as reading and normalising the features.
    ids = features["sample_ids"]
    blocks = features.iter_rows("features", chunk_rows, start=writer.rows_done) if isinstance(centroids, ScanHead) \
        else preprocessed_blocks(features, pca, chunk_rows, start=writer.rows_done)
    with reporter.progress("pseudolabel", total=n, completed=writer.rows_done) as advance:
        for offset, block in blocks:
            if isinstance(centroids, ScanHead):
                check_finite(np.asarray(block, dtype=np.float32), offset, features)
                labels, distance, confidence = head_labels(block, centroids)
            else:
                distances, nearest = nearest_centroids(block, centroids, min(2, len(centroids)), "faiss")
                second = distances[:, 1] if distances.shape[1] > 1 else distances[:, 0]
                labels, distance = nearest[:, 0], distances[:, 0]
                confidence = (second - distances[:, 0]).astype(np.float32)
            end = offset + len(block)
            writer.append(
                sample_ids=ids[offset:end], labels=labels, distance=distance, confidence=confidence,
                targets=targets[offset:end] if targets is not None else np.full(len(block), -1, np.int64),
            )
            advance(len(block))


def summary_of(path) -> dict:
    with H5Artifact(path, "labels", required=("labels", "sample_ids")) as labels:
        return {"rows": labels.rows("labels"), "k": labels.attrs.get("k"), "metrics": labels.attrs.get("metrics") or None}
