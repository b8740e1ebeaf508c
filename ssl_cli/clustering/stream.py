"""DeepCluster preprocessing over features streamed from disk in chunks (memory bounded by a chunk)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ssl_cli.artifacts.h5 import H5Artifact
from ssl_cli.clustering.preprocess import PCA, CovarianceAccumulator, preprocess
from ssl_cli.errors import UserError

# Rows are read in blocks of about this many bytes of float32 features: large enough for BLAS and
# faiss to work on big matrices, small enough that a stage's memory stays flat as N grows
# (a block and its preprocessed copy are alive at once).
CHUNK_BYTES = 64 * 2**20


def chunk_rows_for(features: H5Artifact, requested: int | None) -> int:
    """`requested`, or as many rows of this file's features as fit in CHUNK_BYTES (float32)."""
    if requested:
        return requested
    return max(1024, CHUNK_BYTES // (4 * int(features["features"].shape[1])))


def check_finite(block: np.ndarray, offset: int, features: H5Artifact) -> None:
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        first = offset + int(np.argmax(bad))
        sample_id = features["sample_ids"].asstr()[first]
        raise UserError(f"{features.path} has NaN or inf in {int(bad.sum())}+ row(s), first at row {first} "
                        f"({sample_id}); re-extract the features or drop those images")


def pca_sample(features: H5Artifact, dim: int, sample_rows: int, seed: int) -> np.ndarray:
    """(N,) bool: the seeded sample of rows a PCA to `dim` is fitted on (the same rows on every torchrun rank),
    or a UserError when `dim` exceeds the features' width or the sample is too small for it."""
    n, width = features["features"].shape
    if dim > width:
        raise UserError(f"--pca-dim {dim} exceeds the feature dimension {width}; use --pca-dim {width} or less, or 0 for no PCA")
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).choice(n, size=min(n, sample_rows), replace=False)] = True
    if chosen.sum() <= dim:
        raise UserError(f"--pca-dim {dim} needs more than {dim} sampled rows, have {int(chosen.sum())}; "
                        f"raise --pca-sample or lower --pca-dim")
    return chosen


def fit_pca_streamed(features: H5Artifact, dim: int, sample_rows: int, seed: int, chunk_rows: int) -> PCA:
    """Fit a whitening PCA on a seeded sample of rows, read chunk by chunk; checks every row is finite.

    Returns a PCA mapping (N, D) -> (N, dim).
    """
    chosen = pca_sample(features, dim, sample_rows, seed)
    accumulator = CovarianceAccumulator()
    for offset, block in features.iter_rows("features", chunk_rows):
        block = block.astype(np.float32, copy=False)
        check_finite(block, offset, features)
        picked = block[chosen[offset : offset + len(block)]]
        if len(picked):
            accumulator.update(picked)
    return accumulator.finalize(dim, whiten=True)


def preprocessed_blocks(features: H5Artifact, pca: PCA | None, chunk_rows: int,
                        start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (offset, block) from row `start` on: (rows, d) float32 blocks of at most `chunk_rows`
    rows, PCA-projected (if any) and L2-normalised. A row with NaN or inf is a UserError naming it."""
    for offset, block in features.iter_rows("features", chunk_rows, start=start):
        try:
            reduced = preprocess(block, pca, overwrite_x=True)  # the block is a fresh read
        except ValueError:
            # preprocess finds bad rows at no extra cost; the raw block is scanned only to name them
            check_finite(np.asarray(block, dtype=np.float32), offset, features)
            raise
        yield offset, reduced


def reduce_streamed(features: H5Artifact, pca: PCA | None, chunk_rows: int) -> np.ndarray:
    """All rows, PCA-projected (if any) and L2-normalised: (N, D) on disk -> (N, d) float32 in memory."""
    n = features.rows("features")
    width = pca.dim_out if pca is not None else features["features"].shape[1]
    if 0 < n <= chunk_rows:  # one block holds every row: no second (N, d) array
        return next(preprocessed_blocks(features, pca, chunk_rows))[1]
    out = np.empty((n, width), dtype=np.float32)
    for offset, block in preprocessed_blocks(features, pca, chunk_rows):
        out[offset : offset + len(block)] = block
    return out


def pca_arrays(pca: PCA | None) -> dict[str, np.ndarray]:
    if pca is None:
        return {}
    return {"pca_mean": pca.mean, "pca_components": pca.components, "pca_scale": pca.scale}


def pca_from_artifact(clusters: H5Artifact) -> PCA | None:
    if "pca_components" not in clusters:
        return None
    return PCA(clusters.array("pca_mean"), clusters.array("pca_components"), clusters.array("pca_scale"))
