"""Neighbour mining: auto's switch from exact to a faiss index, the index's recall against exact, a rank's
`rows` giving the rows of the full mining, the neighbours artifact recording (and keyed by) the method,
and what happens without faiss."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.clustering import neighbours as mining
from ssl_cli.clustering.neighbours import mine_neighbours, mining_settings, recall_at_k, search_neighbours
from ssl_cli.config import ClusterConfig
from ssl_cli.errors import UserError
from ssl_cli.report import SilentReporter
from ssl_cli.stages.scan import neighbours_of

pytest.importorskip("faiss")


def mixture(rows: int = 3000, dim: int = 32, components: int = 30, seed: int = 0) -> np.ndarray:
    """Clustered float32 rows (rows, dim): a Gaussian mixture, the shape real features have (uniform random
    vectors are an index's worst case)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim))
    return (centres[rng.integers(components, size=rows)] + 0.6 * rng.standard_normal((rows, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return mixture()


@pytest.fixture(scope="module")
def exact(features):
    return mine_neighbours(features, 20, "exact")


def test_recall_counts_the_exact_neighbours_found_in_any_order():
    exact = np.array([[1, 2, 3, 4], [0, 2, 3, 4]])
    assert recall_at_k(np.array([[4, 3, 2, 1], [0, 9, 8, 7]]), exact) == pytest.approx(5 / 8)
    assert recall_at_k(np.array([[1, 2, -1, -1], [4, 3, 2, 0]]), exact) == pytest.approx(6 / 8)


def test_auto_is_exact_below_the_threshold_and_ivf_above_it(features, exact):
    below = search_neighbours(features, 20, "auto", exact_max_rows=len(features))
    above = search_neighbours(features, 20, "auto", exact_max_rows=len(features) - 1)
    assert below.record["method"] == "exact" and not below.record["approximate"]
    assert np.array_equal(below.indices, exact[0])
    assert above.record["method"] == "ivf" and above.record["approximate"]
    assert above.record["nprobe"] < above.record["nlist"]  # an index that scans part of the rows


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_an_index_finds_95_percent_of_the_exact_neighbours(features, exact, method):
    found = search_neighbours(features, 20, method)
    assert found.indices.shape == (len(features), 20) and found.indices.dtype == np.int64
    assert found.distances.dtype == np.float32 and (np.diff(found.distances, axis=1) >= -1e-6).all()
    assert not (found.indices == np.arange(len(features))[:, None]).any()  # never its own neighbour
    assert recall_at_k(found.indices, exact[0]) >= 0.95
    assert found.record["calibration_recall"] >= 0.95
    same = found.indices == exact[0]  # where the same neighbour is found, at the same distance
    assert np.allclose(found.distances[same], exact[1][same], atol=1e-5)


@pytest.mark.parametrize("method", ["exact", "ivf"])
@pytest.mark.parametrize("rows", [slice(1000, 2000), np.array([2999, 0, 17, 1500])])
def test_rows_mine_the_rows_of_the_full_mining(features, exact, method, rows):
    full = exact if method == "exact" else mine_neighbours(features, 20, method)
    part = mine_neighbours(torch.from_numpy(features), 20, method, rows=rows)
    assert np.array_equal(part[0], full[0][rows])
    assert np.allclose(part[1], full[1][rows], atol=1e-6)


def test_the_neighbours_artifact_records_the_method_and_is_keyed_by_it(features, tmp_path):
    cfg = ClusterConfig(method="scan", model=tmp_path / "p.pt", data="toy", k=4, out=tmp_path / "c.h5",
                        neighbours_k=20, neighbours_method="ivf", device="cpu")
    inputs = [{"path": "f.h5", "fingerprint": "0" * 64}]
    records = {method: make_provenance("neighbours", "scan", {}, mining_settings(20, method), inputs)
               for method in ("exact", "ivf", "hnsw")}
    assert len({record.fingerprint for record in records.values()}) == 3  # another method, another file
    ids = np.array([str(i) for i in range(len(features))], dtype=object)
    path = tmp_path / "neighbours.h5"
    reporter = SilentReporter()
    indices, _ = neighbours_of(cfg, path, records["ivf"], "ivf", features, np.full(len(features), -1), ids, reporter)
    with h5py.File(path) as handle:
        assert handle.attrs["method"] == "ivf" and bool(handle.attrs["approximate"])
        assert {"nlist", "nprobe", "calibration_recall", "faiss_gpu"} <= set(handle.attrs)
        assert np.array_equal(handle["indices"][...], indices)
    assert any("ivf index, recall@20" in message for message in reporter.messages)


def test_without_faiss_auto_warns_and_mines_exactly_and_ivf_is_an_error(features, exact, monkeypatch):
    def missing():
        raise UserError("faiss is not installed")

    monkeypatch.setattr(mining, "import_faiss", missing)
    warnings: list[str] = []
    found = search_neighbours(features, 20, "auto", exact_max_rows=100, warn=warnings.append)
    assert found.record["method"] == "exact" and np.array_equal(found.indices, exact[0])
    assert len(warnings) == 1 and "faiss is not installed" in warnings[0]
    for method in ("ivf", "hnsw"):
        with pytest.raises(UserError, match=f"--neighbours-method {method} needs faiss.*ssl-cli\\[cpu\\]"):
            mine_neighbours(features, 20, method)


def test_the_flag_belongs_to_scan(cli, tmp_path):
    result = cli("cluster", "--features", tmp_path / "f.h5", "--k", "4", "--neighbours-method", "ivf",
                 "--out", tmp_path / "c.h5")
    assert result.exit_code == 2 and "--neighbours-method belongs to --method scan" in result.output, result.output


def test_calibration_keeps_two_standard_errors_above_the_target() -> None:
    """A step whose sampled recall only just reaches the target is not taken: the unsampled rows may miss it."""
    from ssl_cli.clustering.neighbours import calibrate

    truth = np.arange(400 * 10).reshape(400, 10)
    rng = np.random.default_rng(0)

    def search(step: int) -> np.ndarray:  # step 1: every row finds 95% on average, spread over rows; step 2: all
        found = truth.copy()
        if step == 1:
            misses = rng.permutation(np.repeat([0, 1], [200, 200]))  # half the rows miss one of ten
            found[misses == 1, 0] = -1
        return found

    step, recall = calibrate(search, [1, 2], truth, target=0.95)
    assert recall == 1.0 and step == 2  # step 1's 0.95 has no standard error to spare
    step, recall = calibrate(search, [1, 2], truth, target=0.90)
    assert step == 1 and recall == pytest.approx(0.95)
