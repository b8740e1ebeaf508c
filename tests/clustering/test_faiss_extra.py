"""faiss is an extra with two builds; without either, k-means says which to install."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ssl_cli.clustering.kmeans import train_kmeans
from ssl_cli.errors import UserError


def test_missing_faiss_says_which_extra_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    with pytest.raises(UserError, match=r"ssl-cli\[cpu\].*ssl-cli\[gpu\].*--backend torch"):
        train_kmeans(x, 2, 2, 0, 256, backend="faiss")
    assert train_kmeans(x, 2, 2, 0, 256, backend="torch").centroids.shape == (2, 4)


def test_the_installed_build_clusters() -> None:
    faiss = pytest.importorskip("faiss")
    x = np.concatenate([np.zeros((20, 2)), np.full((20, 2), 10.0)]).astype(np.float32)
    result = train_kmeans(x, 2, 5, 0, 256, backend="faiss", gpu="auto")
    assert sorted(result.centroids[:, 0].round().tolist()) == [0.0, 10.0], faiss.__version__
