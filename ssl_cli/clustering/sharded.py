"""DeepCluster preprocessing and nearest-centroid assignment over a range of a features file's rows,
read block by block, so `ssl cluster` never holds more rows than it needs.

Under torchrun each rank takes one contiguous shard of whole read blocks (``shard_rows``): it reads,
checks and PCA-reduces only those rows. The numbers are those of one process:
- the PCA is fitted on the same seeded sample, its float64 sums added block by block in row order,
  the running sums passed from rank to rank (``fit_pca_sharded``), so they are the same additions
  in the same order as ``stream.fit_pca_streamed``'s;
- a block is projected and normalised alone, and the blocks are the same ones (shards are whole
  blocks), so every reduced row is the same bytes.
With one process the shard is every row and nothing is sent.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING

import numpy as np

from ssl_cli.artifacts.h5 import H5Artifact
from ssl_cli.clustering.kmeans import nearest_centroids
from ssl_cli.clustering.preprocess import PCA, CovarianceAccumulator
from ssl_cli.clustering.stream import pca_sample, preprocessed_blocks
from ssl_cli.errors import UserError
from ssl_cli.train.ranks import ProcessGroup

if TYPE_CHECKING:
    import torch
# torch and torch.distributed are imported only under torchrun (group.active): one process never loads them


def shard_rows(n: int, chunk_rows: int, group: ProcessGroup) -> range:
    """This rank's rows of `n`: whole read blocks ([b * chunk_rows, (b + 1) * chunk_rows)), split as
    evenly as blocks allow (a rank may get none when there are fewer blocks than ranks)."""
    blocks = -(-n // chunk_rows)
    first, last = group.rank * blocks // group.world, (group.rank + 1) * blocks // group.world
    return range(min(n, first * chunk_rows), min(n, last * chunk_rows))


def _blocks(features: H5Artifact, pca: PCA | None, chunk_rows: int, rows: range):
    """(offset, (m, d) float32) preprocessed blocks of `rows` (which start on a block boundary)."""
    count = -(-len(rows) // chunk_rows)
    return islice(preprocessed_blocks(features, pca, chunk_rows, start=rows.start), count)


def fit_pca_sharded(features: H5Artifact, dim: int, sample_rows: int, seed: int, chunk_rows: int,
                    rows: range, group: ProcessGroup, device: torch.device) -> PCA:
    """`stream.fit_pca_streamed`, each rank reading only `rows` (its shard): the same PCA, bit for bit.

    The seeded sample is drawn over all N rows on every rank; rank r adds its sampled rows to the
    running float64 sums it receives from rank r - 1 and sends them on; the last rank's sums are
    the fit. A row with NaN or inf on any rank is a UserError on every rank (no rank is left waiting).
    Returns a PCA mapping (N, D) -> (N, dim).
    """
    width = int(features["features"].shape[1])
    chosen = pca_sample(features, dim, sample_rows, seed)
    # wire: [first bad row or -1, accumulator state]
    wire = np.zeros(1 + CovarianceAccumulator().state(width).size, dtype=np.float64)
    if group.rank > 0:
        import torch

        from ssl_cli.train import distributed

        wire = distributed.receive_from(torch.from_numpy(wire), group.rank - 1).numpy()
    bad = int(wire[0]) if group.rank > 0 else -1
    accumulator = CovarianceAccumulator.from_state(wire[1:], width)
    if bad < 0:
        count = -(-len(rows) // chunk_rows)
        for offset, block in islice(features.iter_rows("features", chunk_rows, start=rows.start), count):
            block = block.astype(np.float32, copy=False)
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad = offset + int(np.argmin(finite))
                break
            picked = block[chosen[offset : offset + len(block)]]
            if len(picked):
                accumulator.update(picked)
    wire = np.concatenate([[float(bad)], accumulator.state(width)])
    if group.active:
        import torch

        from ssl_cli.train import distributed

        wire = torch.from_numpy(wire)
        if group.rank < group.world - 1:
            distributed.send_to(wire, group.rank + 1)
        wire = distributed.broadcast_from(wire, group.world - 1, group).numpy()
    bad = int(wire[0])
    if bad >= 0:
        sample_id = features["sample_ids"].asstr()[bad]
        raise UserError(f"{features.path} has NaN or inf in row {bad} ({sample_id}) (and maybe later rows); "
                        "re-extract the features or drop those images")
    return CovarianceAccumulator.from_state(wire[1:], width).finalize(dim, whiten=True)


def reduce_rows(features: H5Artifact, pca: PCA | None, chunk_rows: int, rows: range) -> np.ndarray:
    """`rows` of the features, PCA-projected (if any) and L2-normalised: (len(rows), d) float32."""
    width = pca.dim_out if pca is not None else int(features["features"].shape[1])
    blocks = _blocks(features, pca, chunk_rows, rows)
    if len(rows) <= chunk_rows:  # one block: no second copy
        return next(iter(blocks), (0, np.empty((0, width), np.float32)))[1]
    out = np.empty((len(rows), width), dtype=np.float32)
    for offset, block in blocks:
        out[offset - rows.start : offset - rows.start + len(block)] = block
    return out


def gather_reduced_rows(features: H5Artifact, pca: PCA | None, chunk_rows: int, picks: np.ndarray) -> np.ndarray:
    """The preprocessed rows `picks` (global row ids, any order, no repeats), in the order of `picks`:
    (len(picks), d) float32, read in one pass over the file (every block is reduced as
    `reduce_rows` reduces it, so each row is the same bytes)."""
    n = features.rows("features")
    width = pca.dim_out if pca is not None else int(features["features"].shape[1])
    out = np.empty((len(picks), width), dtype=np.float32)
    order = np.argsort(picks, kind="stable")
    sorted_rows = picks[order]
    for offset, block in _blocks(features, pca, chunk_rows, range(n)):
        low, high = np.searchsorted(sorted_rows, [offset, offset + len(block)])
        out[order[low:high]] = block[sorted_rows[low:high] - offset]
    return out


def assign_rows(features: H5Artifact, pca: PCA | None, chunk_rows: int, rows: range, centroids: np.ndarray,
                backend: str, device: torch.device | None = None,
                reduced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each of `rows`, block by block: (len(rows),) float32 squared distances and
    (len(rows),) int64 centroid ids. `reduced`: those rows already preprocessed ((len(rows), d)), else
    each block is read and reduced here and dropped after its search."""
    distances = np.empty(len(rows), dtype=np.float32)
    ids = np.empty(len(rows), dtype=np.int64)
    blocks = ((rows.start + start, reduced[start : start + chunk_rows]) for start in range(0, len(rows), chunk_rows)) \
        if reduced is not None else _blocks(features, pca, chunk_rows, rows)
    for offset, block in blocks:
        block_distances, block_ids = nearest_centroids(block, centroids, 1, backend, device)
        local = slice(offset - rows.start, offset - rows.start + len(block))
        distances[local], ids[local] = block_distances[:, 0], block_ids[:, 0]
    return distances, ids
