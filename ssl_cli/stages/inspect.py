"""`ssl inspect FILE`: schema, provenance and contents of any artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssl_cli.artifacts.checkpoint import describe_checkpoint
from ssl_cli.artifacts.h5 import describe
from ssl_cli.artifacts.schema import parse_schema
from ssl_cli.errors import UserError


def run(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass an artifact file (.h5 or .pt)")
    with open(path, "rb") as handle:
        is_hdf5 = handle.read(8) == b"\x89HDF\r\n\x1a\n"
    if not is_hdf5:
        return describe_checkpoint(path)
    info = describe(path)
    if parse_schema(info["attrs"].get("schema")) is None:
        raise UserError(f"{path} is an HDF5 file but not an ssl-cli artifact (no schema attribute)")
    if not info["attrs"].get("complete", True):
        info["attrs"]["warning"] = "incomplete"
    return info
