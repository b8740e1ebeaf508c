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
    schema = parse_schema(info["attrs"].get("schema"))
    if schema is None:
        raise UserError(f"{path} is an HDF5 file but not an ssl-cli artifact (no schema attribute)")
    if not info["attrs"].get("complete", True):
        info["attrs"]["warning"] = "incomplete"
    if schema[0] == "clusters" and "pca_dim_used" not in info["attrs"]:
        add_older_pca(info)
    return info


def add_older_pca(info: dict[str, Any]) -> None:
    """Clusters written before `pca_dim_used` was recorded: the dimension is that of the stored
    projection (then always whitened), so inspect shows the same two lines for every file."""
    shapes = {item["name"]: item["shape"] for item in info["datasets"]}
    dim = int(shapes["pca_components"][0]) if "pca_components" in shapes else 0
    info["attrs"]["pca_dim_used"] = f"{dim} (from pca_components: an older file without this attribute)"
    info["attrs"]["pca_whitened"] = dim > 0
