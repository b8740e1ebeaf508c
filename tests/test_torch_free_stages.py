"""Stages that need no network never load torch (~1.8 s of start and ~300 MB of RSS at every launch):
`ssl cluster` with faiss in one process (its default), and `ssl toy-data`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py


def loads_torch(code: str) -> bool:
    """Run `code` in a fresh interpreter; whether torch was imported by the end of it."""
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


def test_faiss_kmeans_in_one_process_never_imports_torch(features_h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "clusters.h5"
    assert not loads_torch("from pathlib import Path\nfrom ssl_cli.config import ClusterConfig\n"
                           "from ssl_cli.stages import cluster\n"
                           f"cluster.run(ClusterConfig(features=Path({str(features_h5)!r}), out=Path({str(out)!r}), "
                           "k=4, pca_dim=16, progress=False))")
    with h5py.File(out, "r") as clusters:
        assert clusters["assignments"].shape == (96,)


def test_toy_data_into_a_store_never_imports_torch(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    assert not loads_torch(f"from ssl_cli.cli import main\nimport sys\nsys.argv = ['ssl', 'toy-data', {str(out)!r}, "
                           "'--n', '16', '--classes', '2', '--size', '16', '--workers', '1']\n"
                           "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code")
    assert out.exists()
