"""What a k-means run gives back, whichever backend ran it (no torch: the faiss path never loads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class KMeansResult:
    """What one k-means run produced.

    centroids: (k, d) float32.
    objective: one entry per iteration, the sum of squared distances of the training points to
        their nearest centroid at that iteration's assignment step (faiss's ``Kmeans.obj``).
    n_empty_splits: how many times an empty cluster was re-seeded by splitting a populated one.
    """

    centroids: np.ndarray
    objective: list[float] = field(default_factory=list)
    n_empty_splits: int = 0
