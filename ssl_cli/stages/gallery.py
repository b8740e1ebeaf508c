"""`ssl gallery`: what a clustering or a pseudo-labelling put together, as a picture.

One row per cluster (clusters.h5) or per pseudo-label (labels.h5 from `ssl pseudolabel` or
`ssl self-train`), with its size and, where targets exist, its purity and majority class, then
its best images: nearest the centroid (`distances`/`distance`) or most confident first
(`confidence`). Rows join to the images of --data by sample id, never by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_cli.artifacts.h5 import H5Artifact, read_root_attrs
from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.artifacts.schema import parse_schema
from ssl_cli.data.sources import ImageSource, UnreadableImage, open_source
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.viz.figure import check_out, require_matplotlib, save_figure
from ssl_cli.viz.gallery import GalleryRow, draw_gallery, gallery_size

ORDERS = ("largest", "purest", "mixed")
RANKS = ("distance", "confidence")
SOURCES = "clusters.h5 from `ssl cluster` or labels.h5 from `ssl pseudolabel` / `ssl self-train`"


@dataclass(frozen=True)
class Grouping:
    """What an artifact says about its N rows.

    noun: "cluster" (k-means ids) or "class" (a self-train teacher's predictions).
    sample_ids (N,) str; groups (N,) int64: cluster or label per row; targets (N,) int64, -1 unknown;
    score (N,) float: the key that ranks rows inside a group, best first when sorted by
    `descending`; class_names: the artifact's own names of target classes (may be empty).
    """

    kind: str
    noun: str
    rank: str
    sample_ids: np.ndarray
    groups: np.ndarray
    targets: np.ndarray
    score: np.ndarray
    descending: bool
    class_names: list[str]


@dataclass(frozen=True)
class GroupStats:
    """One cluster or label: its size, how many rows have a target, the most common target and the
    share of known targets equal to it (majority and purity are None without targets)."""

    group: int
    size: int
    known: int
    majority: int | None
    purity: float | None


@claim_scope()
def run(artifact: Path, data: str, out: Path, *, order: str = "largest", rows: int = 10, per_row: int = 8,
        rank: str | None = None, thumb_size: int = 64, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    check_options(order, rows, per_row, rank, thumb_size)
    claim_output(out)  # one writer per picture; released when run returns
    fmt = check_out(out, force)
    require_matplotlib()
    grouping = read_grouping(artifact, rank)
    source = open_source(data)
    positions = join_ids(grouping.sample_ids, source, artifact, data)
    stats = group_stats(grouping.groups, grouping.targets)
    if order != "largest" and not any(stat.known for stat in stats):
        raise UserError(f"--order {order} ranks by purity, which needs targets, but {artifact} has none "
                        "(all -1); use --order largest")
    chosen = order_groups(stats, order)[:rows]
    names = source.classes or grouping.class_names
    gallery, unreadable = [], 0
    for stat in chosen:
        row, skipped = gallery_row(grouping, stat, source, positions, per_row, names)
        gallery.append(row)
        unreadable += skipped
    if unreadable:
        reporter.warn(f"{unreadable} unreadable image(s) skipped; the next ranked images took their place")
    save_figure(draw_gallery(gallery, per_row, thumb_size), out, fmt)
    width, height = gallery_size(len(gallery), per_row, thumb_size)
    groups_noun = {"cluster": "clusters", "class": "classes"}[grouping.noun]
    summary = {"artifact": grouping.kind, groups_noun: len(stats), "rows": len(gallery), "per_row": per_row,
               "order": order, "rank": grouping.rank, "shown": ", ".join(str(stat.group) for stat in chosen),
               "unreadable": unreadable, "pixels": f"{width}x{height}"}
    return StageResult("gallery", out, "written", summary)


def check_options(order: str, rows: int, per_row: int, rank: str | None, thumb_size: int) -> None:
    if order not in ORDERS:
        raise UserError(f"--order {order!r} is not one of {', '.join(ORDERS)}")
    if rank is not None and rank not in RANKS:
        raise UserError(f"--rank {rank!r} is not one of {', '.join(RANKS)}")
    if rows < 1 or per_row < 1:
        raise UserError(f"--clusters ({rows}) and --per-cluster ({per_row}) must be at least 1")
    if not 16 <= thumb_size <= 512:
        raise UserError(f"--thumb-size {thumb_size} is out of range; use 16 to 512 pixels")


def read_grouping(path: Path, rank: str | None) -> Grouping:
    """The groups, targets and ranking key of a clusters or labels artifact (kind read from its schema)."""
    kind = artifact_kind(path)
    if kind == "clusters":
        if rank == "confidence":
            raise UserError(f"{path} is a clusters file, which has no confidence; use --rank distance, "
                            "or pass labels.h5 from `ssl pseudolabel`")
        with H5Artifact(path, "clusters", required=("assignments", "distances", "sample_ids")) as clusters:
            groups, score = clusters.array("assignments"), clusters.array("distances")
            return Grouping("clusters", "cluster", "distance", clusters.strings("sample_ids"),
                            groups.astype(np.int64), _targets(clusters, len(groups)),
                            score.astype(np.float64), False, _class_names(clusters))
    rank = rank or "confidence"
    with H5Artifact(path, "labels", required=("labels", "sample_ids")) as labels:
        if rank not in labels:
            raise UserError(f"{path} has no {rank} dataset (self-train labels rank by confidence only); "
                            f"use --rank {'confidence' if rank == 'distance' else 'distance'}")
        groups = labels.array("labels").astype(np.int64)
        # a self-train round's labels.h5 (it has the policy's `selected` rows) holds a teacher's class
        # predictions; `ssl pseudolabel`'s holds cluster ids
        noun = "class" if "selected" in labels else "cluster"
        return Grouping("labels", noun, rank, labels.strings("sample_ids"), groups,
                        _targets(labels, len(groups)), labels.array(rank).astype(np.float64),
                        rank == "confidence", _class_names(labels))


def artifact_kind(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path} does not exist; pass {SOURCES}")
    try:
        schema = parse_schema(read_root_attrs(path).get("schema"))
    except OSError:
        schema = None
    if path.is_dir() or schema is None:
        raise UserError(f"{path} is not an ssl-cli artifact; pass {SOURCES}")
    if schema[0] not in ("clusters", "labels"):
        raise UserError(f"{path} holds {schema[0]}, not clusters or labels; pass {SOURCES}")
    return schema[0]


def _targets(artifact: H5Artifact, n: int) -> np.ndarray:
    return artifact.array("targets").astype(np.int64) if "targets" in artifact else np.full(n, -1, np.int64)


def _class_names(artifact: H5Artifact) -> list[str]:
    names = artifact.attrs.get("classes")
    return [str(name) for name in names] if isinstance(names, list) else []


def join_ids(sample_ids: np.ndarray, source: ImageSource, artifact: Path, data: str) -> np.ndarray:
    """(N,) int64: the position in `source` of each of the artifact's `sample_ids`."""
    position = {sample_id: i for i, sample_id in enumerate(source.sample_ids)}
    found = np.fromiter((position.get(sample_id, -1) for sample_id in sample_ids), np.int64, len(sample_ids))
    missing = sample_ids[found < 0]
    if len(missing):
        examples = ", ".join(map(str, missing[:3]))
        raise UserError(f"{len(missing)} of {len(sample_ids)} sample ids of {artifact} are not in --data "
                        f"{data} (e.g. {examples}); pass the images the features were extracted from")
    return found


def group_stats(groups: np.ndarray, targets: np.ndarray) -> list[GroupStats]:
    """Size, majority target and purity of every group that has rows.

    groups (N,) int64, targets (N,) int64 with -1 for unknown -> one GroupStats per distinct group, by id.
    """
    ids, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(ids))
    known = targets >= 0
    classes = int(targets.max()) + 1 if known.any() else 1
    # (G, classes) counts of each known target per group
    counts = np.bincount(inverse[known] * classes + targets[known], minlength=len(ids) * classes)
    counts = counts.reshape(len(ids), classes)
    totals, majority = counts.sum(axis=1), counts.argmax(axis=1)
    return [GroupStats(int(group), int(size), int(total), int(top) if total else None,
                       float(counts[g, top] / total) if total else None)
            for g, (group, size, total, top) in enumerate(zip(ids, sizes, totals, majority))]


def order_groups(stats: list[GroupStats], order: str) -> list[GroupStats]:
    """largest: most rows first; purest: highest purity first; mixed: lowest purity first. Ties go to
    the larger group, then the lower id; groups without targets come last under purity orders."""
    if order == "largest":
        return sorted(stats, key=lambda s: (-s.size, s.group))
    sign = -1 if order == "purest" else 1
    return sorted(stats, key=lambda s: (s.purity is None, sign * (s.purity or 0.0), -s.size, s.group))


def ranked_members(grouping: Grouping, group: int) -> np.ndarray:
    """Rows of `group`, best first (nearest the centroid, or most confident)."""
    members = np.flatnonzero(grouping.groups == group)
    key = grouping.score[members]
    return members[np.argsort(-key if grouping.descending else key, kind="stable")]


def gallery_row(grouping: Grouping, stat: GroupStats, source: ImageSource, positions: np.ndarray,
                per_row: int, names: list[str]) -> tuple[GalleryRow, int]:
    """The row of one group and how many of its images were unreadable (the next ranked ones stand in)."""
    images, flagged, skipped = [], [], 0
    for row in ranked_members(grouping, stat.group):
        if len(images) == per_row:
            break
        try:
            images.append(source.load(int(positions[row])))
        except UnreadableImage:
            skipped += 1
            continue
        target = int(grouping.targets[row])
        flagged.append(stat.majority is not None and target >= 0 and target != stat.majority)
    title = f"{grouping.noun} {class_name(stat.group, names) if grouping.noun == 'class' else stat.group}"
    details = [f"{stat.size} image{'s' if stat.size != 1 else ''}"]
    if stat.purity is not None:
        share = "" if stat.known == stat.size else f" of {stat.known} known"
        details += [f"purity {stat.purity:.2f}{share}", f"majority: {class_name(stat.majority, names)}"]
    return GalleryRow(title, tuple(details), tuple(images), tuple(flagged)), skipped


def class_name(target: int, names: list[str]) -> str:
    return names[target] if 0 <= target < len(names) else str(target)
