"""What a clusters file holds, in short: the summary `ssl cluster` prints for k-means and SCAN alike."""

from __future__ import annotations

from ssl_cli.artifacts.h5 import H5Artifact


def summary_of(path) -> dict:
    """k, rows, PCA (k-means) or method (SCAN), empty clusters and metrics of the clusters file at `path`."""
    with H5Artifact(path, "clusters", required=("assignments",)) as clusters:
        attrs = clusters.attrs
        if attrs.get("method") == "scan":
            return {"k": attrs["k"], "rows": clusters.rows("assignments"), "method": "scan",
                    "empty_clusters": attrs["n_empty"], "metrics": attrs.get("metrics") or None}
        pca_dim, whitened = pca_used(clusters)
        return {"k": attrs["k"], "rows": clusters.rows("assignments"),
                "pca": describe_pca(pca_dim, whitened, (attrs.get("config") or {}).get("pca_dim")),
                "empty_clusters": attrs["n_empty"], "metrics": attrs.get("metrics") or None}


def pca_used(clusters: H5Artifact) -> tuple[int, bool]:
    """(PCA dimension, whitened) of a clusters file; files written before the `pca_dim_used`
    attribute existed always whitened, and their dimension is that of the stored projection."""
    attrs = clusters.attrs
    if "pca_dim_used" in attrs:
        return int(attrs["pca_dim_used"]), bool(attrs["pca_whitened"])
    dim = int(clusters["pca_components"].shape[0]) if "pca_components" in clusters else 0
    return dim, dim > 0


def describe_pca(dim: int, whitened: bool, requested: int | str | None) -> str:
    """'10, whitened (auto)', '32, whitened' or 'none' for the result summary."""
    if not dim:
        return "none"
    return f"{dim}{', whitened' if whitened else ''}{' (auto)' if requested == 'auto' else ''}"
