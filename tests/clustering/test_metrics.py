"""Clustering metrics against scikit-learn as the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ssl_cli.clustering.metrics import ari, cluster_quality, hungarian_accuracy, majority_accuracy, nmi


@pytest.mark.parametrize("seed", range(5))
def test_nmi_and_ari_match_sklearn_on_random_labelings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 2000))
    true = rng.integers(0, int(rng.integers(2, 12)), n)
    # Correlated with the truth so the scores are not all near zero.
    pred = np.where(rng.random(n) < 0.6, true * 7 + 3, rng.integers(0, 40, n))
    assert nmi(true, pred) == pytest.approx(normalized_mutual_info_score(true, pred), abs=1e-12)
    assert ari(true, pred) == pytest.approx(adjusted_rand_score(true, pred), abs=1e-12)


@pytest.mark.parametrize(
    ("true", "pred"),
    [
        ([0, 0, 0, 0], [5, 5, 5, 5]),  # both constant
        ([0, 0, 1, 1], [3, 3, 3, 3]),  # one cluster
        ([4, 4, 4, 4], [0, 1, 2, 3]),  # one class
        ([0, 1, 2, 3], [0, 1, 2, 3]),  # all singletons
        ([0, 1, 2, 3], [9, 9, 8, 8]),
        ([7], [2]),
    ],
)
def test_degenerate_cases_follow_sklearn(true: list[int], pred: list[int]) -> None:
    assert nmi(np.array(true), np.array(pred)) == normalized_mutual_info_score(true, pred)
    assert ari(np.array(true), np.array(pred)) == adjusted_rand_score(true, pred)


def test_permuted_perfect_clustering_scores_one() -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 10, 1000)
    # Sparse, non-contiguous cluster ids: a permutation of 10 values out of 0..1999.
    relabel = rng.permutation(2000)[:10]
    pred = relabel[true]
    assert hungarian_accuracy(true, pred) == 1.0
    assert majority_accuracy(true, pred) == 1.0
    assert nmi(true, pred) == pytest.approx(1.0)
    assert ari(true, pred) == pytest.approx(1.0)


def test_pure_overclustering_has_majority_one_but_hungarian_below_one() -> None:
    rng = np.random.default_rng(1)
    true = rng.integers(0, 3, 600)
    # Each class split into 4 pure clusters: k = 12 > 3 classes.
    pred = true * 4 + rng.integers(0, 4, 600)
    assert majority_accuracy(true, pred) == 1.0
    assert hungarian_accuracy(true, pred) < 0.5


def test_hungarian_accuracy_matches_brute_force_with_more_classes_than_clusters() -> None:
    from itertools import permutations

    rng = np.random.default_rng(2)
    true = rng.integers(0, 5, 300)
    pred = rng.integers(0, 3, 300)
    best = max(
        sum(int(np.sum((pred == cluster) & (true == cls))) for cluster, cls in enumerate(match))
        for match in permutations(range(5), 3)
    )
    assert hungarian_accuracy(true, pred) == pytest.approx(best / 300)


def test_majority_accuracy_is_purity() -> None:
    true = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([1999, 1999, 1999, 5, 5, 5])
    # Cluster 1999 -> class 0 (2 of 3), cluster 5 -> class 1 (2 of 3).
    assert majority_accuracy(true, pred) == pytest.approx(4 / 6)


def test_cluster_quality_scores_only_known_targets() -> None:
    rng = np.random.default_rng(3)
    true = rng.integers(0, 4, 500)
    pred = rng.integers(0, 6, 500)
    unknown = rng.random(500) < 0.3
    masked = np.where(unknown, -1, true)
    quality = cluster_quality(masked, pred)
    assert quality is not None
    assert quality["n_scored"] == int((~unknown).sum())
    assert quality["nmi"] == pytest.approx(normalized_mutual_info_score(true[~unknown], pred[~unknown]))
    assert quality["ari"] == pytest.approx(adjusted_rand_score(true[~unknown], pred[~unknown]))
    assert quality["acc_hungarian"] == pytest.approx(hungarian_accuracy(true[~unknown], pred[~unknown]))
    assert quality["acc_majority"] == pytest.approx(majority_accuracy(true[~unknown], pred[~unknown]))


def test_cluster_quality_is_none_without_known_targets() -> None:
    assert cluster_quality(np.full(10, -1), np.arange(10)) is None


def test_large_sparse_labels_stay_cheap() -> None:
    # 1.3M rows, k = 2000 clusters, 1000 classes: must not build N x k arrays.
    rng = np.random.default_rng(4)
    true = rng.integers(0, 1000, 1_300_000)
    pred = (true * 2 + rng.integers(0, 2, true.size)) % 2000
    quality = cluster_quality(true, pred)
    assert quality is not None
    assert quality["acc_majority"] == 1.0
    # Every class owns two clusters of its own, so the best matching keeps the larger half of each.
    halves = np.bincount(pred, minlength=2000).reshape(1000, 2)
    assert quality["acc_hungarian"] == pytest.approx(halves.max(axis=1).sum() / true.size)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same length"):
        nmi(np.zeros(3, dtype=int), np.zeros(4, dtype=int))


def test_majority_accuracy_is_left_out_where_small_clusters_make_it_one() -> None:
    # k = 2000 on 4,000 rows (the case): random clusters already score a purity near 1
    rng = np.random.default_rng(5)
    true = rng.integers(0, 10, 4000)
    pred = np.arange(4000) % 2000
    assert majority_accuracy(true, pred) > 0.5  # what would have been reported: 5x chance from random clusters
    quality = cluster_quality(true, pred)
    assert quality is not None and "acc_majority" not in quality
    assert "2000 clusters on 4000 scored rows" in quality["acc_majority_omitted"]
    assert quality["acc_hungarian"] == pytest.approx(hungarian_accuracy(true, pred))


def test_majority_accuracy_is_kept_from_ten_rows_per_used_cluster() -> None:
    true = np.arange(400) % 4
    kept = cluster_quality(true, np.arange(400) % 40)  # 10 rows per cluster
    assert kept is not None and "acc_majority_omitted" not in kept and kept["acc_majority"] == 1.0
    # empty clusters do not count: 41 rows per id used, though the ids run up to 390
    sparse = cluster_quality(true, (np.arange(400) % 10) * 39)
    assert sparse is not None and "acc_majority" in sparse
    assert "acc_majority" not in cluster_quality(true[:399], np.arange(399) % 40)
