"""`ssl extract` and `ssl cluster --backend torch` under torchrun (2 gloo ranks): each rank does its
share of the rows and the output equals a one-process run's."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from interrupts import dies_on_call

from ssl_cli.config import ClusterConfig
from ssl_cli.stages import cluster, extract
from ssl_cli.train.distributed import ProcessGroup

BATCH = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(args: list[object], ranks: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "ssl_cli", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {name: handle[name][...] for name in handle}


@pytest.fixture(scope="module")
def broken_toy(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy images plus one unreadable file, so the merge has skipped ids to carry."""
    root = tmp_path_factory.mktemp("sharded") / "toy"
    shutil.copytree(toy_dir, root)
    (next(p for p in sorted(root.iterdir()) if p.is_dir()) / "zz_broken.png").write_bytes(b"not a png")
    return root


def test_extract_shard_rows_are_whole_batches_of_the_one_process_run() -> None:
    shards = [extract.shard_rows(97, 16, rank, 2) for rank in range(2)]
    assert shards == [range(0, 48), range(48, 97)]
    assert [extract.shard_rows(10, 16, rank, 3) for rank in range(3)] == [range(0, 0), range(0, 0), range(0, 10)]


def test_torchrun_extract_equals_one_process_and_each_rank_did_its_half(broken_toy, extract_cfg, tmp_path) -> None:
    one = extract.run(extract_cfg(broken_toy, tmp_path / "one.h5", batch_size=BATCH)).out
    two = tmp_path / "two.h5"
    torchrun(["extract", "--data", broken_toy, "--out", two, "--arch", "alexnet_lowres", "--layer", "conv2",
              "--workers", 0, "--device", "cpu", "--batch-size", BATCH, "--no-progress"])
    want, got = datasets(one), datasets(two)
    assert sorted(got) == sorted(want) == ["features", "sample_ids", "skipped_ids", "targets"]
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert want["features"].tobytes() == got["features"].tobytes()
    with h5py.File(two, "r") as handle:
        attrs = dict(handle.attrs)
    assert attrs["ranks"] == 2 and attrs["n_skipped"] == 1 and attrs["source_done"] == 97
    assert attrs["rank_source_rows"] == "[[0, 48], [48, 97]]"  # 97 files: 3 batches each
    assert attrs["rank_rows"] == "[47, 49]"  # the broken file sorts into rank 0's half
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]  # the parts are gone


def test_an_interrupted_part_resumes_to_the_same_rows(broken_toy, extract_cfg, tmp_path, monkeypatch) -> None:
    """A rank killed after its first flushed block continues its own part from there."""
    cfg = extract_cfg(broken_toy, tmp_path / "f.h5", batch_size=4)
    prepared = extract.prepare(cfg)
    reader = extract.LayerReader(prepared.network.model, prepared.network.spec, prepared.layer,
                                 cfg.pool, cfg.pool_size).eval()
    rank1 = ProcessGroup(rank=1, world=2)
    real_flush = extract.flush
    monkeypatch.setattr(extract, "flush", dies_on_call(real_flush, 2))  # killed after its first block
    device = extract.resolve_device("cpu")
    with pytest.raises(KeyboardInterrupt):
        extract.extract_part(cfg, prepared, reader, device, 192, rank1, extract.SilentReporter())
    part = extract.part_path(cfg.out, 1, 2)
    with h5py.File(extract.partial_path(part), "r") as handle:
        assert handle.attrs["rows_done"] == 4 * extract.FLUSH_BATCHES
    monkeypatch.setattr(extract, "flush", real_flush)
    assert extract.extract_part(cfg, prepared, reader, device, 192, rank1, extract.SilentReporter())
    whole = extract.run(extract_cfg(broken_toy, tmp_path / "whole.h5", batch_size=4)).out
    rows = extract.shard_rows(97, 4, 1, 2)
    with h5py.File(part, "r") as got, h5py.File(whole, "r") as want:
        skipped_before = 1 if rows.start > 0 else 0  # the broken file is in rank 0's half
        expected = slice(rows.start - skipped_before, rows.stop - skipped_before)
        assert got.attrs["shard_start"] == rows.start and got.attrs["rows_done"] == len(rows)
        assert got["features"][...].tobytes() == want["features"][expected].tobytes()
        np.testing.assert_array_equal(got["sample_ids"][...], want["sample_ids"][expected])


# --- ssl cluster --------------------------------------------------------------------------------------

CLUSTER = ["--k", 4, "--pca-dim", 16, "--chunk-rows", 32, "--device", "cpu", "--no-progress"]


def test_torchrun_torch_kmeans_equals_one_process_and_each_rank_read_its_blocks(features_h5, cli, tmp_path) -> None:
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    assert cli("cluster", "--features", features_h5, "--out", one, "--backend", "torch", *CLUSTER).exit_code == 0
    torchrun(["cluster", "--features", features_h5, "--out", two, "--backend", "torch", *CLUSTER])
    want, got = datasets(one), datasets(two)
    assert sorted(got) == sorted(want)
    for name in want:  # PCA, centroids, objective, assignments, distances: the same numbers
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with h5py.File(two, "r") as handle:
        # 96 rows in read blocks of 32: rank 0 reads block 0, rank 1 blocks 1 and 2
        assert handle.attrs["ranks"] == 2 and handle.attrs["rank_rows"] == "[32, 64]"


def test_faiss_kmeans_on_gathered_sample_equals_faiss_on_every_row(features_h5, tmp_path) -> None:
    """The stage never builds the (N, d) array, yet gets what faiss makes of it (it subsamples 8 x 4 rows)."""
    from ssl_cli.artifacts.h5 import H5Artifact
    from ssl_cli.clustering.kmeans import nearest_centroids, train_kmeans
    from ssl_cli.clustering.stream import fit_pca_streamed, reduce_streamed

    cfg = ClusterConfig(features=features_h5, out=tmp_path / "c.h5", k=4, pca_dim=16, chunk_rows=40,
                        max_points_per_centroid=8, niter=5, progress=False)
    cluster.run(cfg)
    with H5Artifact(features_h5, "features") as features:
        x = reduce_streamed(features, fit_pca_streamed(features, 16, cfg.pca_sample, 0, 40), 40)
    bare = train_kmeans(x, 4, 5, 0, 8, "faiss", gpu="off")
    distances, ids = nearest_centroids(x, bare.centroids, 1, "faiss")
    got = datasets(cfg.out)
    np.testing.assert_array_equal(got["centroids"], bare.centroids)
    np.testing.assert_array_equal(got["objective"], bare.objective)
    np.testing.assert_array_equal(got["assignments"], ids[:, 0])
    np.testing.assert_array_equal(got["distances"], distances[:, 0])


def test_a_shard_reads_only_its_rows(features_h5, monkeypatch) -> None:
    from ssl_cli.artifacts.h5 import H5Artifact
    from ssl_cli.clustering import sharded
    from ssl_cli.clustering.stream import fit_pca_streamed

    reads: list[tuple[int, int]] = []
    real = H5Artifact.iter_rows

    def counted(self, name, chunk_rows, start=0):
        for offset, block in real(self, name, chunk_rows, start):
            reads.append((offset, offset + len(block)))
            yield offset, block

    with H5Artifact(features_h5, "features") as features:
        whole = fit_pca_streamed(features, 16, 100_000, 0, 32)
        monkeypatch.setattr(H5Artifact, "iter_rows", counted)
        alone = ProcessGroup()
        assert sharded.shard_rows(96, 32, ProcessGroup(rank=1, world=2)) == range(32, 96)
        pca = sharded.fit_pca_sharded(features, 16, 100_000, 0, 32, range(0, 96), alone, torch.device("cpu"))
        for part in ("mean", "components", "scale"):  # one process: fit_pca_streamed's numbers exactly
            np.testing.assert_array_equal(getattr(pca, part), getattr(whole, part))
        reads.clear()
        sharded.fit_pca_sharded(features, 16, 100_000, 0, 32, range(32, 96), alone, torch.device("cpu"))
        x = sharded.reduce_rows(features, pca, 32, range(32, 96))
        sharded.assign_rows(features, pca, 32, range(32, 96), np.zeros((4, 16), np.float32), "torch")
    assert x.shape == (64, 16)
    assert reads and all(32 <= start and stop <= 96 for start, stop in reads), reads


def test_faiss_backend_under_torchrun_is_refused_with_the_way_out(features_h5, tmp_path, monkeypatch) -> None:
    from ssl_cli.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # a rank that claims no lock, so nothing is held by the refusal
    with pytest.raises(UserError, match="--backend torch"):
        cluster.run(ClusterConfig(features=features_h5, out=tmp_path / "c.h5", k=4, progress=False))
    assert not (tmp_path / "c.h5.partial").exists()
