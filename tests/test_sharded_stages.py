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
    real_flush, calls = extract.flush, []

    def flush_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_flush(*args, **kwargs)

    monkeypatch.setattr(extract, "flush", flush_then_die)
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
