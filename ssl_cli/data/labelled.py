"""Labels join images by sample id, never by position alone."""

from __future__ import annotations


import numpy as np

from ssl_cli.data.sources import ImageSource
from ssl_cli.errors import UserError


def join_by_id(source: ImageSource, label_ids: np.ndarray, labels_path: str) -> np.ndarray:
    """(M,) label sample ids -> (M,) int64 source indices. Ids missing on either side are an error
    that names some of them and the counts: labels never join images by position."""
    position = {sample_id: index for index, sample_id in enumerate(source.sample_ids)}
    missing = [sample_id for sample_id in label_ids if sample_id not in position]
    labelled = set(label_ids)
    extra = [sample_id for sample_id in source.sample_ids if sample_id not in labelled]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} labelled id(s) are not images of {source.spec} (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} image(s) have no label in {labels_path} (e.g. {', '.join(extra[:3])})")
        raise UserError("; ".join(parts) + "; pseudolabel the same --data you train on")
    return np.array([position[sample_id] for sample_id in label_ids], dtype=np.int64)
