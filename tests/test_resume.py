"""Interrupted stages resume to the same bytes, and `ssl run` skips, stops and re-runs as planned.

The SIGKILL test runs the real CLI in a subprocess and kills it once a first block of rows is on
disk; the in-process tests stop a stage at chosen points (right after a block is flushed) to
cover the windows a random kill would only rarely hit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ssl_cli.artifacts.h5 import RowWriter, partial_path
from ssl_cli.config import PseudolabelConfig
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.stages import extract, pseudolabel

ROW_DATASETS = ("features", "sample_ids", "targets")


def _extract_args(data: Path, out: Path) -> list[str]:
    return ["extract", "--data", str(data), "--out", str(out), "--arch", "resnet18_lowres", "--layer", "layer1",
            "--pool", "avg", "--pool-size", "2", "--batch-size", "16", "--workers", "0", "--device", "cpu",
            "--no-progress"]


def _ssl(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), COLUMNS="300")
    return subprocess.Popen([sys.executable, "-m", "ssl_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


def _rows_done(path: Path) -> int:
    """rows_done of a file another process is writing; 0 while it cannot be read consistently."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return int(handle.attrs.get("rows_done", 0))
    except (OSError, KeyError, RuntimeError, ValueError):
        return 0


def assert_same_rows(got: Path, want: Path, datasets=ROW_DATASETS) -> None:
    with h5py.File(got, "r") as a, h5py.File(want, "r") as b:
        for name in datasets:
            left, right = a[name], b[name]
            if left.dtype.kind == "O":
                assert list(left.asstr()[...]) == list(right.asstr()[...]), name
            else:
                assert left.dtype == right.dtype, name
                np.testing.assert_array_equal(left[...], right[...], err_msg=name)
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
        assert a.attrs["rows_done"] == b.attrs["rows_done"] == a[datasets[0]].shape[0]


@pytest.fixture(scope="module")
def toy600(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy600") / "images"
    write_toy_folder(root, n=600, classes=6, size=32, seed=3)
    return root


# --- (1) extract killed with SIGKILL ------------------------------------------------------------


def test_extract_killed_with_sigkill_resumes_to_identical_content(toy600: Path, tmp_path: Path) -> None:
    out = tmp_path / "features.h5"
    partial = partial_path(out)
    reference = tmp_path / "reference.h5"
    # The uninterrupted run starts at once, in parallel; it is a separate process like the others,
    # so thread counts and library state match.
    reference_run = _ssl(*_extract_args(toy600, reference))

    victim = _ssl(*_extract_args(toy600, out))
    deadline = time.monotonic() + 120
    while _rows_done(partial) == 0:
        assert victim.poll() is None, f"extract ended before it could be killed:\n{victim.stdout.read()}"
        assert time.monotonic() < deadline, "no rows were flushed within 120 s"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run finished before the kill; the test proves nothing"

    assert partial.exists()
    assert not out.exists(), "<out> must not exist until the stage is complete"
    done_at_kill = _rows_done(partial)
    assert 0 < done_at_kill < 600

    resumed = _ssl(*_extract_args(toy600, out))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed" in output, output
    assert out.exists() and not partial.exists()

    reference_output, _ = reference_run.communicate(timeout=300)
    assert reference_run.returncode == 0, reference_output
    assert_same_rows(out, reference)
    with h5py.File(out, "r") as handle:
        assert handle.attrs["complete"] and handle.attrs["source_done"] == 600
        assert handle["features"].shape == (600, 256)


# --- in-process interruptions at chosen points ----------------------------------------------------


class Interrupted(BaseException):
    """Stands in for a kill: a BaseException, so the stages' cleanup paths run as for Ctrl-C."""


def _interrupt_after_appends(monkeypatch, count: int) -> None:
    """Make RowWriter.append raise right after its `count`-th call has written and flushed its rows."""
    original = RowWriter.append
    calls = {"n": 0}

    def append(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == count:
            raise Interrupted

    monkeypatch.setattr(RowWriter, "append", append)


@pytest.mark.parametrize("blocks", [1, 2])
def test_extract_stopped_right_after_a_flushed_block(monkeypatch, toy_dir: Path, extract_cfg, tmp_path: Path,
                                                     blocks: int) -> None:
    """The narrowest window: rows are on disk, nothing after the append has run yet."""
    out, reference = tmp_path / "f.h5", tmp_path / "reference.h5"
    extract.run(extract_cfg(toy_dir, reference, batch_size=4))  # 96 rows, a block every 8 batches = 32 rows

    with monkeypatch.context() as patch:
        _interrupt_after_appends(patch, blocks)
        with pytest.raises(Interrupted):
            extract.run(extract_cfg(toy_dir, out, batch_size=4))
    assert not out.exists() and partial_path(out).exists()
    with h5py.File(partial_path(out), "r") as handle:
        assert handle.attrs["rows_done"] == 32 * blocks

    result = extract.run(extract_cfg(toy_dir, out, batch_size=4))
    assert result.status == "resumed"
    assert_same_rows(out, reference)


def test_extract_resume_keeps_skipped_images_named_once(monkeypatch, toy_dir: Path, extract_cfg,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "toy"
    shutil.copytree(toy_dir, folder)
    images = sorted(folder.rglob("*.png"))
    # one unreadable image in the first block of 32 rows and one in the last
    for victim in (images[5], images[90]):
        victim.write_bytes(victim.read_bytes()[:40])
    bad = sorted(path.relative_to(folder).as_posix() for path in (images[5], images[90]))
    out, reference = tmp_path / "f.h5", tmp_path / "reference.h5"
    extract.run(extract_cfg(folder, reference, batch_size=4))

    with monkeypatch.context() as patch:
        _interrupt_after_appends(patch, 1)
        with pytest.raises(Interrupted):
            extract.run(extract_cfg(folder, out, batch_size=4))
    extract.run(extract_cfg(folder, out, batch_size=4))
    assert_same_rows(out, reference)
    with h5py.File(out, "r") as handle:
        assert sorted(handle["skipped_ids"].asstr()[...]) == bad
        assert handle.attrs["n_skipped"] == 2
        assert handle["features"].shape[0] == 94


def test_pack_stopped_right_after_a_flushed_block(monkeypatch, toy600: Path, tmp_path: Path) -> None:
    from ssl_cli.config import PackConfig
    from ssl_cli.stages import pack

    def config(path: Path) -> PackConfig:
        return PackConfig(data=str(toy600), out=path, progress=False)

    out, reference = tmp_path / "images.h5", tmp_path / "reference.h5"
    pack.run(config(reference))
    with monkeypatch.context() as patch:
        _interrupt_after_appends(patch, 1)  # after the first block of 512 images
        with pytest.raises(Interrupted):
            pack.run(config(out))
    with h5py.File(partial_path(out), "r") as handle:
        assert handle.attrs["rows_done"] == 512
    pack.run(config(out))
    assert_same_rows(out, reference, ("images", "sample_ids", "targets"))


def test_pseudolabel_stopped_mid_run_resumes_to_identical_content(monkeypatch, features_h5: Path,
                                                                  clusters_h5: Path, tmp_path: Path) -> None:
    out, reference = tmp_path / "l.h5", tmp_path / "reference.h5"

    def config(path: Path) -> PseudolabelConfig:
        return PseudolabelConfig(clusters=clusters_h5, features=features_h5, out=path, chunk_rows=20, progress=False)

    pseudolabel.run(config(reference))
    with monkeypatch.context() as patch:
        _interrupt_after_appends(patch, 2)
        with pytest.raises(Interrupted):
            pseudolabel.run(config(out))
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as handle:
        assert handle.attrs["rows_done"] == 40
    result = pseudolabel.run(config(out))
    assert result.status == "resumed" and result.summary["resumed"]
    assert_same_rows(out, reference, ("labels", "sample_ids", "distance", "confidence", "targets"))


# --- (3) ssl run ----------------------------------------------------------------------------------

STAGES = """\
stages:
  toy:
    cmd: toy-data
    params: {out: toy, n: 120, classes: 4, size: 32, seed: 0}
  extract:
    cmd: extract
    params: {data: toy, arch: alexnet_lowres, layer: conv2, out: features.h5, workers: 0, device: cpu,
             progress: false}
  cluster:
    cmd: cluster
    params: {features: features.h5, k: 4, pca_dim: 16, niter: 10, seed: 0, out: clusters.h5, progress: false}
  pseudolabel:
    cmd: pseudolabel
    params: {clusters: clusters.h5, features: features.h5, out: labels.h5, progress: false}
"""
OUTPUTS = {"extract": "features.h5", "cluster": "clusters.h5", "pseudolabel": "labels.h5"}


def _plan(output: str) -> dict[str, tuple[str, str]]:
    """{stage: (action, why)} from the plan table `ssl run` prints."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) == 4 and cells[0] in ("toy", *OUTPUTS):
            rows[cells[0]] = (cells[2], cells[3])
    return rows


def _outputs(root: Path) -> dict[str, tuple[int, bytes]]:
    return {name: ((root / file).stat().st_mtime_ns, (root / file).read_bytes())
            for name, file in OUTPUTS.items() if (root / file).exists()}


def _datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {name: handle[name][...] for name in handle}


def test_ssl_run_plans_skips_stops_and_forces(cli, snapshot, tmp_path: Path) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(STAGES)

    # --dry-run prints the plan and writes nothing
    before = snapshot(tmp_path)
    result = cli("run", stages, "--dry-run")
    assert result.exit_code == 0, result.output
    plan = _plan(result.output)
    assert list(plan) == ["toy", "extract", "cluster", "pseudolabel"]
    assert all(action == "run" for action, _ in plan.values())
    assert snapshot(tmp_path) == before

    # --until cluster runs the chain up to cluster and not pseudolabel
    result = cli("run", stages, "--until", "cluster")
    assert result.exit_code == 0, result.output
    assert list(_plan(result.output)) == ["toy", "extract", "cluster"]
    assert (tmp_path / "clusters.h5").exists() and not (tmp_path / "labels.h5").exists()

    # the full run then only runs what is missing
    result = cli("run", stages)
    assert result.exit_code == 0, result.output
    plan = _plan(result.output)
    assert [plan[name][0] for name in ("toy", "extract", "cluster")] == ["skip"] * 3
    assert plan["pseudolabel"][0] == "run"
    assert (tmp_path / "labels.h5").exists()

    # a second run skips every stage and touches nothing
    state = snapshot(tmp_path)
    result = cli("run", stages)
    assert result.exit_code == 0, result.output
    assert all(action == "skip" for action, _ in _plan(result.output).values()), result.output
    assert snapshot(tmp_path) == state

    # --force cluster: the plan says cluster and everything downstream run, and they do
    result = cli("run", stages, "--force", "cluster", "--dry-run")
    plan = _plan(result.output)
    assert plan["toy"][0] == plan["extract"][0] == "skip"
    assert plan["cluster"] == ("run", "forced") and plan["pseudolabel"][0] == "run"
    assert snapshot(tmp_path) == state

    old = _outputs(tmp_path)
    old_data = {name: _datasets(tmp_path / OUTPUTS[name]) for name in ("cluster", "pseudolabel")}
    time.sleep(0.01)
    result = cli("run", stages, "--force", "cluster")
    assert result.exit_code == 0, result.output
    new = _outputs(tmp_path)
    assert new["extract"] == old["extract"]
    for name in ("cluster", "pseudolabel"):
        assert new[name][0] != old[name][0], f"{name} was not re-run"
        fresh = _datasets(tmp_path / OUTPUTS[name])
        assert fresh.keys() == old_data[name].keys()
        for key, values in old_data[name].items():
            np.testing.assert_array_equal(fresh[key], values, err_msg=f"{name}/{key}")
    toy_after = {key: value for key, value in snapshot(tmp_path).items() if key.startswith("toy/")}
    assert toy_after == {key: value for key, value in state.items() if key.startswith("toy/")}


def test_ssl_run_replaces_stale_outputs(cli, tmp_path: Path) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(STAGES)
    assert cli("run", stages).exit_code == 0
    stages.write_text(STAGES.replace("k: 4", "k: 3"))
    result = cli("run", stages, "--dry-run")
    plan = _plan(result.output)
    assert plan["cluster"][0] == "run" and plan["cluster"][1].startswith("stale")
    assert plan["pseudolabel"][0] == "run" and plan["extract"][0] == "skip"
    result = cli("run", stages)
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "clusters.h5", "r") as clusters, h5py.File(tmp_path / "labels.h5", "r") as labels:
        assert clusters["centroids"].shape[0] == 3
        assert labels.attrs["k"] == 3 and labels["labels"][...].max() <= 2


def test_ssl_run_resumes_an_interrupted_stage(monkeypatch, cli, tmp_path: Path) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(STAGES.replace("progress: false}", "progress: false, batch_size: 8}", 1))
    assert cli("run", stages, "--until", "toy").exit_code == 0
    with monkeypatch.context() as patch:
        _interrupt_after_appends(patch, 1)
        with pytest.raises(Interrupted):
            cli("run", stages)
    assert partial_path(tmp_path / "features.h5").exists()
    plan = _plan(cli("run", stages, "--dry-run").output)
    assert plan["extract"] == ("resume", "interrupted earlier")
    result = cli("run", stages)
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    with h5py.File(tmp_path / "features.h5", "r") as handle:
        assert handle["features"].shape[0] == 120
        assert list(handle["sample_ids"].asstr()[...]) == sorted(handle["sample_ids"].asstr()[...])
