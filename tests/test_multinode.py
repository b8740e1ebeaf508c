"""Two nodes simulated on one machine: `torchrun --nnodes 2 --node-rank {0,1}`, rendezvous on 127.0.0.1, gloo.

Each "node" is its own torchrun agent with one process (LOCAL_RANK 0 on both, RANK 0 and 1), as on two
machines that share the output folder. The chain runs end to end: a pretext epoch on both nodes, features
extracted from its checkpoint (in this process), then `ssl cluster --backend torch` on both nodes. Checked:
every launch exits 0; each artifact exists once, whole, with no `.partial` or `.lock` left beside it; the
2-node checkpoint is bit-identical to a 2-process single-node torchrun run (same ranks, seeds and global
batch: the node layout must not change a number); the 2-node clusters equal one process's on the same
features (assignments and ids exactly, centroids to 1e-5: each rank's float32 block sums add in another
order). Every launch has a timeout, so a hung rendezvous fails the test instead of hanging the suite.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ssl_cli.artifacts import lock
from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.config import ClusterConfig, ExtractConfig
from ssl_cli.errors import UserError
from ssl_cli.stages import cluster, extract

LAUNCH_TIMEOUT = 120  # seconds for every process of one launch; a healthy one takes 10-20 s on 2 busy cores

PRETEXT = ["pretext", "--task", "rotation", "--arch", "alexnet_lowres", "--width", "0.25", "--image-size", "32",
           "--batch-size", "16", "--lr", "0.005", "--workers", "0", "--device", "cpu", "--no-progress",
           "--deterministic", "--seed", "0", "--epochs", "1"]
CLUSTER = ["cluster", "--k", "4", "--pca-dim", "16", "--niter", "10", "--backend", "torch", "--device", "cpu",
           "--no-progress"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(args: list[str], nnodes: int, node_rank: int, nproc: int, port: int, log: Path) -> subprocess.Popen:
    """One torchrun agent (a "node") with static rendezvous at 127.0.0.1:port, in its own process group."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node",
               str(nproc), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "ssl_cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    with log.open("w") as sink:
        return subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def two_nodes(args: list[str], logs: Path) -> list[subprocess.Popen]:
    port = free_port()
    return [torchrun(args, 2, rank, 1, port, logs / f"node{rank}.log") for rank in (0, 1)]


def finish(launches: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every agent of one launch; fail with the logs if one fails or the launch outlives LAUNCH_TIMEOUT.

    A node that failed leaves the other waiting for it (torchrun's exit barrier, a rendezvous), so the rest are
    killed at once then, as they are on a timeout."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while time.monotonic() < deadline and any(launch.poll() is None for launch in launches) \
            and not any(launch.returncode for launch in launches):
        time.sleep(0.1)
    stopped = [launch for launch in launches if launch.poll() is None]
    for launch in stopped:
        kill(launch)
    text = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert not stopped and all(launch.returncode == 0 for launch in launches), \
        f"{len(stopped)} launch(es) killed, still running after a failure or {LAUNCH_TIMEOUT} s:\n{text}"


def kill(launch: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers (torchrun starts each worker in a session of its own)."""
    workers = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
               if _parent_pid(stat) == launch.pid]
    os.killpg(launch.pid, signal.SIGKILL)
    for worker in workers:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launch.wait()


def _parent_pid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after the state, past "(comm)"
    except (OSError, IndexError, ValueError):
        return None


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def leftovers(folder: Path) -> list[str]:
    """Temporary files a finished stage must not leave: partials, locks, ranks' parts."""
    return [name for name in names(folder) if any(mark in name for mark in (".partial", ".lock", ".rank"))]


def test_two_nodes_run_pretext_then_torch_cluster_like_one_node(toy_dir, tmp_path):
    multi, single, logs = tmp_path / "nodes", tmp_path / "single", tmp_path / "logs"
    for folder in (multi, single, logs):
        folder.mkdir()
    node_logs = [logs / "node0.log", logs / "node1.log"]
    # both launches at once: each is mostly torch imports, and the two share no port and no file
    launches = two_nodes([*PRETEXT, "--data", str(toy_dir), "--out", str(multi / "pretext.pt")], logs)
    launches.append(torchrun([*PRETEXT, "--data", str(toy_dir), "--out", str(single / "pretext.pt")],
                             1, 0, 2, free_port(), logs / "single.log"))
    finish(launches, [*node_logs, logs / "single.log"])
    assert names(multi) == names(single) == ["pretext.metrics.jsonl", "pretext.pt"]  # once, whole, no .lock
    got, want = (torch.load(folder / "pretext.pt", weights_only=True) for folder in (multi, single))
    assert got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][key], want["model"][key]) for key in want["model"])
    assert got["meta"]["fingerprint"] == want["meta"]["fingerprint"]
    assert [row["loss"] for row in got["meta"]["history"]] == [row["loss"] for row in want["meta"]["history"]]

    # features in this process (a 2-node `ssl extract` works too but costs 4 more processes' torch imports)
    features = tmp_path / "features.h5"
    extract.run(ExtractConfig(data=str(toy_dir), model=multi / "pretext.pt", out=features, workers=0,
                              progress=False, device="cpu"))
    launches = two_nodes([*CLUSTER, "--features", str(features), "--out", str(multi / "clusters.h5")], logs)
    # the reference runs in this process while the two nodes work
    one = cluster.run(ClusterConfig(features=features, out=single / "clusters.h5", k=4, pca_dim=16,
                                    niter=10, backend="torch", device="cpu", progress=False))
    finish(launches, node_logs)
    assert one.status == "written"
    assert "clusters.h5" in names(multi) and not leftovers(multi)
    with h5py.File(multi / "clusters.h5") as nodes, h5py.File(single / "clusters.h5") as alone:
        assert (nodes.attrs["ranks"], alone.attrs["ranks"]) == (2, 1)
        assert nodes.attrs["fingerprint"] == alone.attrs["fingerprint"]
        for name in ("assignments", "sample_ids", "cluster_sizes"):
            assert np.array_equal(nodes[name][()], alone[name][()]), name
        np.testing.assert_allclose(nodes["centroids"][()], alone["centroids"][()], rtol=1e-5, atol=1e-5)


# --- the shared filesystem ------------------------------------------------------------------------


@pytest.mark.skipif(lock.fcntl is None or not Path("/proc/self/fd").is_dir(), reason="needs fcntl and /proc")
@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS])
def test_a_filesystem_without_locks_refuses_with_what_to_do(code, monkeypatch, tmp_path):
    """NFS without its lock service answers flock with ENOLCK, Lustre without -o flock with ENOSYS."""
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    out = tmp_path / "features.h5"
    opened = len(os.listdir("/proc/self/fd"))
    with pytest.raises(UserError, match=r"^cannot lock .*features\.h5\.lock: its filesystem keeps no file locks "
                                        r"\(.+\); put --out on one that does"):
        with claim_scope():
            claim_output(out)
    assert len(os.listdir("/proc/self/fd")) == opened  # the lock file's descriptor is closed again
