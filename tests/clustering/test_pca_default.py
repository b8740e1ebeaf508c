"""`ssl cluster --pca-dim auto` (the default) against every fixed --pca-dim, on 600 and 6,000 toy rows.

Features come from a small untrained net (alexnet_lowres at width 0.25, conv3 pooled 2 x 2: 384-d),
computed once per set in memory and written as a features artifact, so the 6,000-row set costs
seconds. bench/pca_default.py measures the same question over more feature kinds and sizes.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ssl_cli.artifacts.h5 import H5Artifact, RowWriter
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.clustering.preprocess import auto_pca_dim
from ssl_cli.config import ClusterConfig, PseudolabelConfig
from ssl_cli.data.toy import draw_toy_image, toy_labels
from ssl_cli.models.layers import LayerReader
from ssl_cli.models.network import network_from_arch
from ssl_cli.stages import cluster, inspect, pseudolabel

CLASSES = 6
FIXED_DIMS = (0, 16, 32, 64, 128, 256)


def toy_features(path: Path, n: int, seed: int) -> Path:
    """n toy images (32 px, 6 classes) through a random alexnet_lowres x0.25, conv3 avg-pooled to
    2 x 2 -> a features artifact with (n, 384) float32 features and the true classes as targets."""
    labels = toy_labels(n, CLASSES, seed)
    images = np.stack([draw_toy_image(i, int(label), CLASSES, 32, seed) for i, label in enumerate(labels)])
    network = network_from_arch("alexnet_lowres", None, 32, seed=0, arch_kwargs={"width": 0.25})
    reader = LayerReader(network.model.eval(), network.spec, "conv3", pool="avg", pool_size=2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (network.mean, network.std))
    with torch.no_grad():
        batches = [reader((torch.from_numpy(images[i : i + 500]).permute(0, 3, 1, 2).float() / 255 - mean) / std)
                   for i in range(0, n, 500)]
    features = torch.cat(batches).numpy()
    provenance = make_provenance("features", "test", {}, {"toy": n, "seed": seed}, [])
    writer = RowWriter.create(path, provenance, {"features": ((features.shape[1],), np.float32),
                                                 "sample_ids": ((), str), "targets": ((), np.int64)})
    writer.append(features=features, sample_ids=np.array([f"{i:06d}" for i in range(n)], dtype=object),
                  targets=labels.astype(np.int64))
    return writer.commit()


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("pca_default")
    return {n: toy_features(folder / f"toy{n}.h5", n, seed) for n, seed in ((600, 0), (6000, 1))}


def cluster_nmi(features: Path, out: Path, **options) -> tuple[float, dict]:
    result = cluster.run(ClusterConfig(features=features, out=out, k=CLASSES, progress=False, **options))
    return result.summary["metrics"]["nmi"], result.summary


@pytest.mark.parametrize("rows", [600, 6000])
def test_default_is_within_ten_percent_of_the_best_fixed_dim(toy_sets: dict[int, Path], tmp_path: Path,
                                                             rows: int) -> None:
    default, summary = cluster_nmi(toy_sets[rows], tmp_path / "auto.h5")
    fixed = {dim: cluster_nmi(toy_sets[rows], tmp_path / f"{dim}.h5", pca_dim=dim)[0] for dim in FIXED_DIMS}
    assert default >= 0.9 * max(fixed.values()), (default, fixed)
    assert fixed[256] < 0.5 * default, fixed  # the old default, measured in the same run, really was the problem
    assert summary["pca"] == "10, whitened (auto)" and summary["dim"] == 10  # 2 x (k - 1)


def test_auto_dim_rule() -> None:
    assert auto_pca_dim(k=6, rows=600, dim_in=512) == 10  # 2 (k - 1)
    assert auto_pca_dim(k=10_000, rows=100_000, dim_in=4096) == 256  # DeepCluster's 256 for large k
    assert auto_pca_dim(k=50, rows=100_000, dim_in=64) == 64  # never above the feature dimension
    assert auto_pca_dim(k=100, rows=500, dim_in=512) == 50  # at least 10 PCA rows per whitened axis
    assert auto_pca_dim(k=2, rows=5, dim_in=8) == 1


def test_used_dim_is_recorded_shown_and_fingerprinted(toy_sets: dict[int, Path], tmp_path: Path) -> None:
    features = toy_sets[600]
    auto = ClusterConfig(features=features, out=tmp_path / "c.h5", k=CLASSES, progress=False)
    assert cluster.provenance(auto).fingerprint == cluster.provenance(auto).fingerprint
    fixed = auto.model_copy(update={"pca_dim": 10})
    assert cluster.provenance(auto).fingerprint != cluster.provenance(fixed).fingerprint
    # a smaller --pca-sample resolves auto to fewer axes, which the fingerprint must see
    small_sample = auto.model_copy(update={"pca_sample": 50})
    assert cluster.provenance(small_sample).fingerprint != cluster.provenance(auto).fingerprint
    cluster.run(auto)
    with H5Artifact(tmp_path / "c.h5", "clusters") as clusters:
        attrs = clusters.attrs
        assert attrs["pca_dim_used"] == 10 and attrs["pca_whitened"] and attrs["config"]["pca_dim"] == "auto"
        assert clusters["pca_components"].shape == (10, 384)
    shown = inspect.run(tmp_path / "c.h5")["attrs"]
    assert shown["pca_dim_used"] == 10 and shown["pca_whitened"]
    assert cluster.run(auto).summary["pca"] == "10, whitened (auto)"  # up to date: read back from the file
    none = cluster.run(auto.model_copy(update={"pca_dim": 0, "out": tmp_path / "none.h5"}))
    assert none.summary["pca"] == "none" and none.summary["dim"] == 384


def test_older_clusters_files_still_read(toy_sets: dict[int, Path], tmp_path: Path) -> None:
    """A clusters file from before `pca_dim_used`: inspect and the up-to-date summary derive it,
    pseudolabel uses its stored projection unchanged."""
    features = toy_sets[600]
    cfg = ClusterConfig(features=features, out=tmp_path / "old.h5", k=CLASSES, pca_dim=16, progress=False)
    cluster.run(cfg)
    with h5py.File(tmp_path / "old.h5", "r+") as handle:
        del handle.attrs["pca_dim_used"], handle.attrs["pca_whitened"]
    shown = inspect.run(tmp_path / "old.h5")["attrs"]
    assert str(shown["pca_dim_used"]).startswith("16 (from pca_components") and shown["pca_whitened"]
    assert cluster.run(cfg).summary["pca"] == "16, whitened"
    labels = pseudolabel.run(PseudolabelConfig(clusters=tmp_path / "old.h5", features=features,
                                               out=tmp_path / "labels.h5", progress=False))
    with H5Artifact(tmp_path / "old.h5", "clusters") as clusters:
        assignments = clusters.array("assignments")
    with H5Artifact(labels.out, "labels") as stored:
        np.testing.assert_array_equal(stored.array("labels"), assignments)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("32", 32), (0, 0)])
def test_pca_dim_accepts_auto_or_a_count(value, expected) -> None:
    assert ClusterConfig(features="f.h5", out="c.h5", k=3, pca_dim=value).pca_dim == expected


@pytest.mark.parametrize("value", [-3, "-3", "many", 2.5, True])
def test_pca_dim_refuses_anything_else(value) -> None:
    with pytest.raises(ValueError, match="must be auto or a whole number >= 0"):
        ClusterConfig(features="f.h5", out="c.h5", k=3, pca_dim=value)
