"""Shared, session-scoped toy artifacts and CLI helpers.

Everything here is cheap on purpose (32 px toy images, a random-init AlexNet-lowres, workers=0)
and made once per session. Tests that change an artifact copy it to their own tmp_path first;
the session files themselves must stay untouched.
"""

from __future__ import annotations

import os

# One OpenMP thread for the suite and every `ssl` process it starts (they inherit the environment;
# set before torch and faiss load): the nets and batches here are tiny, and on shared cores the
# barriers of a second thread cost more than the work (a self-train round: 111 s of CPU with 2
# threads on a loaded 2-core machine, 23 s with 1, the same result). A value already set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# pytest-xdist's workers are started with COLUMNS=80, and rich's module-level consoles (ssl_cli.ui) fix their
# width from COLUMNS when they are made: every CLI table then wraps at 80 columns whatever the `cli` fixture
# sets. Without it they measure at each call (the `cli` fixture's 400; a subprocess's own terminal).
os.environ.pop("COLUMNS", None)

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ssl_cli.cli import app
from ssl_cli.config import ClusterConfig, ExtractConfig, PseudolabelConfig
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.stages import cluster, extract, pseudolabel

TOY_N = 96
TOY_CLASSES = 4
ARCH = "alexnet_lowres"
LAYER = "conv2"  # 192-d after average pooling
OTHER_LAYER = "conv1"  # 64-d: a "features from another layer" input


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def toy_dir(session_dir: Path) -> Path:
    """96 toy images of 4 classes, 32 px, as <class>/<index>.png."""
    root = session_dir / "toy"
    write_toy_folder(root, n=TOY_N, classes=TOY_CLASSES, size=32, seed=0)
    return root


def extract_config(data: Path | str, out: Path, **overrides) -> ExtractConfig:
    values = {"data": str(data), "out": out, "arch": ARCH, "layer": LAYER, "workers": 0, "progress": False,
              "device": "cpu"}
    values.update(overrides)
    return ExtractConfig(**values)


@pytest.fixture(scope="session")
def extract_cfg() -> Callable[..., ExtractConfig]:
    """extract_cfg(data, out, **overrides): the suite's cheap extract settings as a config."""
    return extract_config


@pytest.fixture(scope="session")
def features_h5(toy_dir: Path, session_dir: Path) -> Path:
    out = session_dir / "features.h5"
    extract.run(extract_config(toy_dir, out))
    return out


@pytest.fixture(scope="session")
def other_layer_features_h5(toy_dir: Path, session_dir: Path) -> Path:
    out = session_dir / "features_conv1.h5"
    extract.run(extract_config(toy_dir, out, layer=OTHER_LAYER))
    return out


@pytest.fixture(scope="session")
def clusters_h5(features_h5: Path, session_dir: Path) -> Path:
    out = session_dir / "clusters.h5"
    cluster.run(ClusterConfig(features=features_h5, out=out, k=TOY_CLASSES, pca_dim=16, niter=10, progress=False))
    return out


@pytest.fixture(scope="session")
def labels_h5(features_h5: Path, clusters_h5: Path, session_dir: Path) -> Path:
    out = session_dir / "labels.h5"
    pseudolabel.run(PseudolabelConfig(clusters=clusters_h5, features=features_h5, out=out, progress=False))
    return out


@pytest.fixture(scope="session")
def cli() -> Callable:
    """`cli("extract", "--data", ...)` runs the typer app in-process and returns click's Result.

    COLUMNS is wide so rich does not wrap paths and messages across lines.
    """
    runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})

    def invoke(*args: object):
        return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)

    return invoke


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root` (relative path -> (mtime_ns, sha256)), to prove nothing changed."""
    return {str(path.relative_to(root)): (path.stat().st_mtime_ns, digest(path))
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def snapshot() -> Callable[[Path], dict[str, tuple[int, str]]]:
    return tree_state


@pytest.fixture(scope="session")
def copy_to() -> Callable[[Path, Path], Path]:
    """copy_to(src, folder) copies a session artifact so a test may modify it."""

    def copy(src: Path, folder: Path) -> Path:
        dest = folder / src.name
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        return dest

    return copy


def _ssl_process(args: list[str]):
    import os
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "ssl_cli", *args], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _killed_then_resumed(args: list[str], out: Path, epochs: int, timeout: float = 300) -> Path:
    """Run `ssl *args --out out` once to the end (-> `reference.pt` beside out), once killed with SIGKILL
    as soon as its first checkpoint is on disk, then resumed; returns the reference. Asserts that the
    kill landed mid-run and that the re-run resumed."""
    import signal
    import time

    import torch

    reference = out.with_name("reference.pt")
    assert _ssl_process([*args, "--out", str(reference)]).wait(timeout=timeout) == 0
    process = _ssl_process([*args, "--out", str(out)])
    partial = out.with_name(out.name + ".partial")
    deadline = time.time() + timeout
    while not partial.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial.exists() and not out.exists()
    assert 1 <= torch.load(partial, weights_only=True)["epoch"] < epochs
    resumed = _ssl_process([*args, "--out", str(out)])
    output = resumed.communicate(timeout=timeout)[0].decode()
    assert resumed.returncode == 0 and "resum" in output, output
    return reference


@pytest.fixture(scope="session")
def killed_then_resumed() -> Callable[..., Path]:
    """killed_then_resumed(args, out, epochs): see `_killed_then_resumed`."""
    return _killed_then_resumed
