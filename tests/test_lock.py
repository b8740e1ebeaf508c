"""One writer per output (ssl_cli/artifacts/lock.py): a second run on the same output exits 2 and
names the first one's PID; the first one's output stays whole; a lock left by a killed process
never blocks the next run.

Most tests are deterministic: a small helper process takes the lock with `claim_output` and
signals through a file once it holds it. One test starts two real `ssl extract` runs on one output
together and freezes the one that takes the lock (SIGSTOP), so the overlap does not depend on timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from ssl_cli.artifacts.h5 import partial_path
from ssl_cli.artifacts.lock import claim_output, claim_scope, lock_path, output_lock
from ssl_cli.errors import UserError

# The helper: claim argv[1] (a lock on the output, as a stage would), optionally leave a
# `<out>.partial` as a writer in progress would and fork a child that outlives it (as DataLoader
# workers would), then write its PID to argv[2] and sleep until killed.
HOLDER = """
import os, sys, time
from pathlib import Path
from ssl_cli.artifacts.lock import claim_output
target, ready, partial, fork = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "fork"
claim_output(target)
if partial:
    Path(partial).write_bytes(b"a writer's unfinished bytes")
if fork and os.fork() == 0:
    time.sleep(60)
    os._exit(0)
ready.write_text(str(os.getpid()))
time.sleep(120)
"""

EXTRACT = ["--arch", "alexnet_lowres", "--layer", "conv2", "--batch-size", "2", "--workers", "0", "--device", "cpu",
           "--no-progress"]
PRETEXT = ["pretext", "--task", "rotation", "--arch", "alexnet_lowres", "--width", "0.25", "--image-size", "32",
           "--batch-size", "32", "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress"]


def writing(out: Path, pid: int) -> str:
    return f"error: {out} is being written by process {pid}; wait for it or choose another --out"


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="400", NO_COLOR="1", PYTHONUNBUFFERED="1")


def ssl(*args: object) -> subprocess.Popen:
    """`python -m ssl_cli ARGS` in its own process, stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "ssl_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())


def finished(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def assert_refused(code: int, output: str, line: str) -> None:
    assert code == 2, output
    assert output.strip() == line, output  # one line, exactly the message: no traceback, no table


@pytest.fixture
def holder(tmp_path: Path):
    """holder(target, partial=False, fork=False) -> the PID of a helper process holding target's lock."""
    started: list[subprocess.Popen] = []

    def start(target: Path, partial: bool = False, fork: bool = False) -> subprocess.Popen:
        ready = tmp_path / f"ready-{len(started)}"
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), str(ready),
                                    str(partial_path(target)) if partial else "", "fork" if fork else "-"],
                                   env=_env())
        started.append(process)
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text()):
            assert process.poll() is None, "the lock holder died before taking the lock"
            assert time.monotonic() < deadline, "the lock holder did not take the lock within 60 s"
            time.sleep(0.01)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


# --- the lock itself --------------------------------------------------------------------------------


def test_a_held_lock_refuses_with_the_holders_pid_and_sigkill_frees_it(holder, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "features.h5"
    process = holder(out, fork=True)  # its forked child lives on after the kill, like a DataLoader worker
    with pytest.raises(UserError) as refused:
        claim_output(out)
    assert f"error: {refused.value}" == writing(out, process.pid)

    process.send_signal(signal.SIGKILL)
    process.wait()
    assert lock_path(out).exists(), "the killed holder left its lock file (a stale one, not locked)"
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists(), "a released lock removes its file"


def test_claims_last_until_the_outermost_scope_and_leave_no_file(tmp_path: Path) -> None:
    out, other = tmp_path / "labels.h5", tmp_path / "other.h5"
    lock_path(out).write_text("999999999\n")  # stale: no process holds it
    with claim_scope():  # a command's scope
        with claim_scope():  # a stage's own, inside it
            claim_output(out)
        assert lock_path(out).exists(), "the command keeps its outputs until it ends"
        with output_lock(out):  # the same process may claim again (re-entrant)
            pass
        with output_lock(other):
            assert lock_path(other).exists()
        assert lock_path(out).exists() and not lock_path(other).exists()
    assert not lock_path(out).exists()
    assert lock_path(tmp_path / "folder") == tmp_path / "folder.lock"  # a folder's lock sits beside it


def test_only_rank_zero_claims_under_torchrun(holder, monkeypatch, tmp_path: Path) -> None:
    out = tmp_path / "student.pt"
    holder(out)
    monkeypatch.setenv("RANK", "1")
    with output_lock(out):  # rank 1 never writes, so it neither takes nor waits for the lock
        pass


# --- stages ---------------------------------------------------------------------------------------


def _lock_holder_pid(out: Path) -> int | None:
    try:
        return int(lock_path(out).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_two_extract_runs_on_one_output(toy_dir: Path, tmp_path: Path) -> None:
    """Two real runs started together: whichever takes the lock first is frozen while it holds it,
    the other is refused with its PID, and the first then finishes a whole, readable file."""
    out = tmp_path / "cc.h5"
    args = ["extract", "--data", toy_dir, "--out", out, *EXTRACT]
    runs = {run.pid: run for run in (ssl(*args), ssl(*args))}
    deadline = time.monotonic() + 120
    while _lock_holder_pid(out) not in runs:
        assert all(run.poll() is None for run in runs.values()), "a run ended before either was seen holding the lock"
        assert time.monotonic() < deadline, "no run took the lock within 120 s"
        time.sleep(0.002)
    first = runs.pop(_lock_holder_pid(out))
    (second,) = runs.values()
    first.send_signal(signal.SIGSTOP)
    try:
        assert_refused(*finished(second), writing(out, first.pid))
    finally:
        first.send_signal(signal.SIGCONT)
    code, output = finished(first)
    assert code == 0 and "(written)" in output, output
    with h5py.File(out, "r") as features:
        assert features.attrs["complete"] and features["features"].shape[0] == 96
    assert not partial_path(out).exists() and not lock_path(out).exists()


def test_pretext_refused_while_held_then_runs_after_the_holder_is_killed(holder, cli, toy_dir: Path,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "pretext.pt"
    process = holder(out, partial=True)
    before = partial_path(out).read_bytes()
    assert_refused(*finished(ssl(*PRETEXT, "--data", toy_dir, "--out", out)), writing(out, process.pid))
    assert partial_path(out).read_bytes() == before, "the refused run touched the other writer's partial"
    assert not out.exists()

    process.send_signal(signal.SIGKILL)
    process.wait()
    result = cli(*PRETEXT, "--data", toy_dir, "--out", out)  # the stale lock file does not block
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["meta"]["task"] == "rotation"
    assert not partial_path(out).exists() and not lock_path(out).exists()


@pytest.mark.parametrize("command", ["toy-data", "permutations", "export"])
def test_other_writers_are_refused_while_held(holder, cli, snapshot, tmp_path: Path, command: str) -> None:
    out = tmp_path / ("toy" if command == "toy-data" else "out.json")
    process = holder(out)
    before = snapshot(tmp_path)
    argv = {"toy-data": ["toy-data", out, "--n", 8],
            "permutations": ["permutations", "--n", 10, "--out", out],
            "export": ["export", tmp_path / "model.pt", "--format", "safetensors", "--out", out]}[command]
    result = cli(*argv)
    assert_refused(result.exit_code, result.output, writing(out, process.pid))
    assert snapshot(tmp_path) == before


STAGES = """\
stages:
  toy:
    cmd: toy-data
    params: {out: toy, n: 16, classes: 4, size: 32, seed: 0}
  extract:
    cmd: extract
    params: {data: toy, arch: alexnet_lowres, layer: conv2, out: features.h5, workers: 0, device: cpu,
             progress: false}
"""


def test_ssl_run_refused_while_another_runs_the_same_stages_file(holder, cli, snapshot, tmp_path: Path) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(STAGES)
    process = holder(stages)
    before = snapshot(tmp_path)
    line = (f"error: {stages} is being run by process {process.pid}; "
            "wait for it or choose another stages file")
    assert_refused(*finished(ssl("run", stages)), line)
    assert snapshot(tmp_path) == before

    process.send_signal(signal.SIGKILL)
    process.wait()
    result = cli("run", stages)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "features.h5").exists()
    assert not list(tmp_path.rglob("*.lock")), "every lock file is removed when its run ends"
