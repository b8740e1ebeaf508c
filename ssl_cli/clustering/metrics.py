"""How well a clustering agrees with known classes: NMI, ARI and two flavours of accuracy.

Everything is computed from the contingency table in numpy, so scoring needs no scikit-learn at
run time. Label values may be arbitrary integers (cluster id 1999 when only three clusters are
used); they are first mapped to dense indices with ``np.unique``, and only the non-zero cells of
the table are materialised, so 1.3M rows against k = 2000 clusters stay cheap.

NMI and ARI follow scikit-learn's conventions exactly, including their degenerate cases, so the
numbers are comparable with published results computed with ``sklearn.metrics``.

Majority accuracy (purity) rises towards 1 as clusters shrink, whatever the features: a cluster of
one row is always pure. ``cluster_quality`` therefore leaves it out, and says why under
``acc_majority_omitted``, when the scored rows hold fewer than ``MIN_ROWS_PER_CLUSTER`` rows per
non-empty cluster (k = 2000 on 4,000 rows gives 2 and a purity near 1 by construction; at 10 rows
per cluster, random clusters of 10 balanced classes already score about 0.27 against chance 0.1,
so numbers below that say more about k than about the features). NMI has the same bias, milder;
ARI and Hungarian accuracy correct for it by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_ROWS_PER_CLUSTER", "ari", "cluster_quality", "hungarian_accuracy", "majority_accuracy", "nmi"]

MIN_ROWS_PER_CLUSTER = 10  # below this many scored rows per non-empty cluster, acc_majority is left out


@dataclass(frozen=True)
class _Contingency:
    """The non-zero cells of a classes × clusters contingency table.

    rows, cols, counts: (nnz,) int64 -- cell coordinates (dense class / cluster index) and count.
    class_sizes: (n_classes,) int64; cluster_sizes: (n_clusters,) int64; n: number of rows.
    """

    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    class_sizes: np.ndarray
    cluster_sizes: np.ndarray
    n: int

    def dense(self) -> np.ndarray:
        """(n_classes, n_clusters) int64 table; only the assignment problem needs it dense."""
        table = np.zeros((self.class_sizes.size, self.cluster_sizes.size), dtype=np.int64)
        table[self.rows, self.cols] = self.counts
        return table


def _as_labels(labels: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer labels, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")
    return array


def _contingency(labels_true: np.ndarray, labels_pred: np.ndarray) -> _Contingency:
    """Sparse contingency table of two labelings.

    labels_true, labels_pred: (N,) integers (any values).
    """
    true = _as_labels(labels_true, "labels_true")
    pred = _as_labels(labels_pred, "labels_pred")
    if true.shape != pred.shape:
        raise ValueError(
            f"labels_true and labels_pred must have the same length, got {true.size} and {pred.size}"
        )
    _, class_index = np.unique(true, return_inverse=True)
    clusters, cluster_index = np.unique(pred, return_inverse=True)
    n_clusters = clusters.size
    # One int64 key per (class, cluster) pair; unique keys are exactly the non-zero cells, which
    # avoids both an N × k indicator matrix and a dense table when classes and clusters are many.
    keys = class_index.astype(np.int64).ravel() * n_clusters + cluster_index.astype(np.int64).ravel()
    cells, counts = np.unique(keys, return_counts=True)
    rows, cols = np.divmod(cells, n_clusters) if n_clusters else (cells, cells)
    class_sizes = np.bincount(class_index.ravel(), minlength=0).astype(np.int64)
    cluster_sizes = np.bincount(cluster_index.ravel(), minlength=0).astype(np.int64)
    return _Contingency(rows, cols, counts.astype(np.int64), class_sizes, cluster_sizes, int(true.size))


def _entropy(sizes: np.ndarray) -> float:
    """Shannon entropy (nats) of a labeling given its (n_labels,) group sizes."""
    total = sizes.sum()
    if sizes.size <= 1 or total == 0:
        return 0.0
    p = sizes / total
    return float(-np.sum(p * (np.log(sizes) - np.log(total))))


def _mutual_information(table: _Contingency) -> float:
    """Mutual information (nats), written as scikit-learn's ``mutual_info_score`` to round the same."""
    if table.class_sizes.size == 1 or table.cluster_sizes.size == 1:
        return 0.0
    total = float(table.n)
    p_cell = table.counts / total
    outer = table.class_sizes[table.rows] * table.cluster_sizes[table.cols]
    log_outer = -np.log(outer.astype(np.float64)) + 2.0 * np.log(total)
    mi = p_cell * (np.log(table.counts.astype(np.float64)) - np.log(total)) + p_cell * log_outer
    # Cells whose contribution is pure rounding noise are zeroed, as scikit-learn does.
    mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def _nmi(table: _Contingency) -> float:
    n_classes, n_clusters = table.class_sizes.size, table.cluster_sizes.size
    # Both labelings constant (or empty): scikit-learn calls this a perfect match.
    if n_classes == n_clusters and n_classes <= 1:
        return 1.0
    mi = _mutual_information(table)
    if mi == 0.0:
        return 0.0
    normalizer = 0.5 * (_entropy(table.class_sizes) + _entropy(table.cluster_sizes))
    return float(mi / normalizer)


def _ari(table: _Contingency) -> float:
    # Pair counts as Python ints: the products below overflow int64 from N of about 1e5 upwards.
    n = table.n
    sum_cells = int(np.sum(table.counts * table.counts))
    sum_classes = int(np.sum(table.class_sizes * table.class_sizes))
    sum_clusters = int(np.sum(table.cluster_sizes * table.cluster_sizes))
    # Ordered pair counts named as in scikit-learn's pair_confusion_matrix, to follow its formula.
    tp = sum_cells - n
    fp = sum_clusters - sum_cells
    fn = sum_classes - sum_cells
    tn = n * n - fp - fn - sum_cells
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _hungarian_accuracy(table: _Contingency) -> float:
    from scipy.optimize import linear_sum_assignment  # 0.35 s of import: only where accuracy is computed

    if table.n == 0:
        raise ValueError("accuracy is undefined for an empty labeling")
    dense = table.dense()
    rows, cols = linear_sum_assignment(dense, maximize=True)
    return float(dense[rows, cols].sum() / table.n)


def _majority_accuracy(table: _Contingency) -> float:
    if table.n == 0:
        raise ValueError("accuracy is undefined for an empty labeling")
    best = np.zeros(table.cluster_sizes.size, dtype=np.int64)
    np.maximum.at(best, table.cols, table.counts)
    return float(best.sum() / table.n)


def nmi(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Normalized mutual information with arithmetic-mean normalisation (scikit-learn's default).

    labels_true, labels_pred: (N,) integer labels; values need not be contiguous.
    Returns a float in [0, 1]; 1.0 when both labelings are constant, 0.0 when only one is.
    """
    return _nmi(_contingency(labels_true, labels_pred))


def ari(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index, as scikit-learn's ``adjusted_rand_score``.

    labels_true, labels_pred: (N,) integer labels. Returns a float in [-0.5, 1]; 1.0 for
    identical partitions (including the degenerate all-in-one and all-singletons cases).
    """
    return _ari(_contingency(labels_true, labels_pred))


def hungarian_accuracy(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes.

    labels_true, labels_pred: (N,) integer labels, N > 0. With more clusters than classes only as
    many clusters as classes get matched and the rest count as errors (and vice versa), which is
    why ``majority_accuracy`` is the number to read when k >> classes.
    """
    return _hungarian_accuracy(_contingency(labels_true, labels_pred))


def majority_accuracy(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Accuracy when every cluster predicts its majority class (cluster purity).

    labels_true, labels_pred: (N,) integer labels, N > 0. Several clusters may map to one class,
    so this reaches 1.0 for any clustering whose clusters are pure, however many there are.
    """
    return _majority_accuracy(_contingency(labels_true, labels_pred))


def cluster_quality(labels_true: np.ndarray, labels_pred: np.ndarray) -> dict[str, float] | None:
    """All metrics at once, scored only on the rows whose class is known.

    labels_true: (N,) integers, -1 (any negative value) meaning "class unknown".
    labels_pred: (N,) integer cluster ids.
    Returns {"nmi", "ari", "acc_hungarian", "acc_majority", "n_scored"} (n_scored an int), or None
    when no row has a known class, so callers can record "not scored" instead of a fake number.
    With fewer than MIN_ROWS_PER_CLUSTER scored rows per non-empty cluster, "acc_majority" is
    replaced by "acc_majority_omitted", a sentence saying why (purity is near 1 by construction there).
    """
    true = _as_labels(labels_true, "labels_true")
    pred = _as_labels(labels_pred, "labels_pred")
    if true.shape != pred.shape:
        raise ValueError(
            f"labels_true and labels_pred must have the same length, got {true.size} and {pred.size}"
        )
    known = true >= 0
    if not known.any():
        return None
    # One table serves all four metrics; building it dominates the cost at 1.3M rows.
    table = _contingency(true[known], pred[known])
    quality: dict = {"nmi": _nmi(table), "ari": _ari(table), "acc_hungarian": _hungarian_accuracy(table)}
    used = table.cluster_sizes.size
    if table.n < MIN_ROWS_PER_CLUSTER * used:
        quality["acc_majority_omitted"] = (
            f"{used} clusters on {table.n} scored rows ({table.n / used:.1f} per cluster, under "
            f"{MIN_ROWS_PER_CLUSTER}): small clusters are pure by chance, so majority accuracy would be near 1 "
            "whatever the features; read acc_hungarian, ARI, or cluster with a smaller k")
    else:
        quality["acc_majority"] = _majority_accuracy(table)
    quality["n_scored"] = int(table.n)
    return quality
