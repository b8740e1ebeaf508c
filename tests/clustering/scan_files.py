"""What the SCAN tests share: the pretext checkpoint they start from and the files a clusters file names."""

from __future__ import annotations

import json
from pathlib import Path

import h5py


def rotation_checkpoint(cli, toy_dir: Path, out: Path) -> Path:
    """A 1-epoch rotation pretext of alexnet_bn_lowres (width 0.25) on the toy images, written to `out`."""
    result = cli("pretext", "--task", "rotation", "--arch", "alexnet_bn_lowres", "--width", "0.25", "--data", toy_dir,
                 "--epochs", "1", "--batch-size", "32", "--workers", "0", "--device", "cpu", "--no-progress",
                 "--out", out)
    assert result.exit_code == 0, result.output
    return out


def intermediates(out: Path) -> dict[str, Path]:
    """The cached files a SCAN clusters file says it was made from (features, neighbours, scan, selflabel...)."""
    with h5py.File(out) as handle:
        return {name: Path(path) for name, path in json.loads(handle.attrs["intermediates"]).items()}
