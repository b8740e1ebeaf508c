"""Which `ssl cluster --pca-dim` holds from hundreds to many thousands of rows? (issue 11)

k-means (k = the number of classes, the stage's defaults) runs after the stage's own preprocessing
(PCA fitted on every row, whitened or not, then L2) and the tables print the NMI against the true
classes, the mean over --seeds k-means seeds.

  A  --pca-dim in {0, 16, 32, 64, 128, 256}, whitened (w: what an explicit --pca-dim does) and
     plain, on toy images (600 and 6,000 rows, 6 classes) and Fashion-MNIST subsets (10 classes):
     raw pixels and layers of randomly initialised resnet18 / resnet18_lowres / alexnet_lowres.
  B  the number of clusters: toy images with 2 to 24 classes (600 rows), whitened dimensions
     k - 1, 2 (k - 1), 2k and 4k. The best whitened dimension follows k, not the row count.

`auto` is what `--pca-dim auto` (ssl_cli.clustering.preprocess.auto_pca_dim) picks and `/best`
its NMI over the best cell of the row, plain PCA included.

Resumable: images and features are ssl artifacts in --work (stages whose output is up to date are
skipped) and every NMI is cached in --work/results.json, so an interrupted run continues and a
re-run only prints. A first run takes about 6.5 CPU-minutes, most of it `ssl extract` and the
PCA of 3,072-d pixels (11 minutes of wall time on 2 cores shared at load 8); --quick, 600 toy
pixel rows, 1,000 Fashion-MNIST ones and one small net (part B for k <= 6), about 2 CPU-minutes;
--large adds 60,000 Fashion-MNIST pixel rows.

    python bench/pca_default.py
    python bench/pca_default.py --quick
    python bench/pca_default.py --work /tmp/pca --seeds 0,1,2,3,4 --json pca.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_cli.artifacts.h5 import H5Artifact
from ssl_cli.clustering.kmeans import nearest_centroids, train_kmeans
from ssl_cli.clustering.metrics import nmi
from ssl_cli.clustering.preprocess import PCA, auto_pca_dim, fit_pca, preprocess
from ssl_cli.config import ExtractConfig, PackConfig
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.stages import extract, pack

DIMS = (0, 16, 32, 64, 128, 256)
FMNIST = "/usr/share/datasets/fashion-mnist"
NITER, MAX_POINTS_PER_CENTROID, PCA_SAMPLE = 20, 256, 100_000  # the stage's defaults


@dataclass(frozen=True)
class ImageSet:
    name: str
    classes: int
    toy_n: int = 0  # toy-data images (32 px), or
    fmnist_limit: int = 0  # the first N images of Fashion-MNIST's training split
    toy_seed: int = 0


@dataclass(frozen=True)
class FeatureSet:
    images: ImageSet
    arch: str | None = None  # None: raw pixels in [0, 1], flattened
    layer: str | None = None
    image_size: int = 32
    width: float | None = None

    @property
    def name(self) -> str:
        if self.arch is None:
            return f"{self.images.name} pixels"
        width = f"x{self.width:g}" if self.width else ""
        return f"{self.images.name} {self.arch}{width}:{self.layer}@{self.image_size}"


def toy(n: int, classes: int, seed: int) -> ImageSet:
    return ImageSet(f"toy{n}" + (f"c{classes}" if classes != 6 else ""), classes, toy_n=n, toy_seed=seed)


TOY600, TOY6000 = toy(600, 6, 0), toy(6000, 6, 1)
FM1K, FM2K, FM10K, FM60K = (ImageSet(f"fmnist{n // 1000}k", 10, fmnist_limit=n) for n in (1000, 2000, 10_000, 60_000))
SMALL_NET = {"arch": "alexnet_lowres", "layer": "conv3", "width": 0.25}  # 96-d, cheap enough for 6,000 rows

PART_A = [
    FeatureSet(TOY600), FeatureSet(TOY600, "resnet18", "pool", 64), FeatureSet(TOY600, "resnet18_lowres", "layer2"),
    FeatureSet(TOY600, "alexnet_lowres", "conv2"), FeatureSet(TOY600, "alexnet_lowres", "conv5"),
    FeatureSet(TOY600, "alexnet_lowres", "fc7"), FeatureSet(TOY600, **SMALL_NET),
    FeatureSet(TOY6000), FeatureSet(TOY6000, "resnet18", "pool"), FeatureSet(TOY6000, "alexnet_lowres", "conv5"),
    FeatureSet(TOY6000, **SMALL_NET),
    FeatureSet(FM1K), FeatureSet(FM2K, "alexnet_lowres", "conv5"), FeatureSet(FM10K),
]
PART_A_QUICK = [FeatureSet(TOY600), FeatureSet(TOY600, **SMALL_NET), FeatureSet(TOY6000, **SMALL_NET), FeatureSet(FM1K)]
PART_B_CLASSES = (2, 3, 4, 6, 10, 24)
PART_B_NETS = ({"arch": "alexnet_lowres", "layer": "conv5"}, SMALL_NET)


def images_h5(image_set: ImageSet, work: Path) -> Path:
    """The set packed into one images .h5 (toy images rendered to a folder first)."""
    out = work / f"{image_set.name}.h5"
    if image_set.toy_n:
        folder = work / image_set.name
        write_toy_folder(folder, n=image_set.toy_n, classes=image_set.classes, size=32, seed=image_set.toy_seed)
        data = str(folder)
    else:
        data = f"fashion-mnist:{FMNIST}:train"
    pack.run(PackConfig(data=data, out=out, limit=image_set.fmnist_limit or None, progress=False, workers=0))
    return out


def load_features(feature_set: FeatureSet, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 features and (N,) int64 targets of one feature set."""
    images = images_h5(feature_set.images, work)
    if feature_set.arch is None:
        with H5Artifact(images, "images") as artifact:
            pixels = artifact.array("images")
            return pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0, artifact.array("targets")
    out = work / f"{feature_set.name.replace(' ', '-').replace(':', '-').replace('@', '-')}.h5"
    extract.run(ExtractConfig(data=str(images), out=out, arch=feature_set.arch, layer=feature_set.layer,
                              image_size=feature_set.image_size, width=feature_set.width, batch_size=250,
                              workers=0, progress=False, device="cpu"))
    with H5Artifact(out, "features") as artifact:
        return artifact.array("features").astype(np.float32), artifact.array("targets")


def nmi_after(x: np.ndarray, targets: np.ndarray, k: int, pca: PCA | None, seed: int) -> float:
    """NMI of k-means on PCA-projected (if any), L2-normalised rows, as `ssl cluster` runs it."""
    reduced = preprocess(x, pca)
    result = train_kmeans(reduced, k, NITER, seed, MAX_POINTS_PER_CENTROID, "faiss", gpu="off")
    _, ids = nearest_centroids(reduced, result.centroids, 1, "faiss")
    return nmi(targets, ids[:, 0])


def cell_name(dim: int, whiten: bool) -> str:
    return "0" if dim == 0 else f"{dim}{'w' if whiten else ''}"


class Cache:
    """NMI per (features, k, dim, whitening, seed) in a JSON file, written after every cell."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute: Callable[[], float]) -> float:
        if key not in self.values:
            self.values[key] = compute()
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(self.values, indent=0, sort_keys=True))
            os.replace(partial, self.path)
        return self.values[key]


def measure(feature_set: FeatureSet, cells: list[tuple[int, bool]], work: Path, seeds: list[int],
            cache: Cache) -> dict:
    """{'rows', 'dim', 'auto', 'cells': {cell name: mean NMI}} for the feasible cells plus auto's."""
    x, targets = load_features(feature_set, work)
    n, width = x.shape
    k = feature_set.images.classes
    auto = auto_pca_dim(k, min(n, PCA_SAMPLE), width)
    wanted = [(d, w) for d, w in cells if d <= min(width, n - 1)]
    wanted += [(auto, True)] if (auto, True) not in wanted else []
    fitted: list[PCA] = []  # one whitened fit at the largest dim serves every cell

    def cell(dim: int, whiten: bool, seed: int) -> float:
        if dim and not fitted:
            fitted.append(fit_pca(x, max(d for d, _ in wanted), whiten=True))
        # The first `dim` axes equal a fit at `dim` (eigenvectors are nested); plain PCA = unit scales.
        pca = None if not dim else PCA(fitted[0].mean, fitted[0].components[:dim],
                                       fitted[0].scale[:dim] if whiten else np.ones(dim, np.float32))
        return nmi_after(x, targets, k, pca, seed)

    values = {}
    for dim, whiten in wanted:
        nmis = [cache.get(f"{feature_set.name}|k{k}|{cell_name(dim, whiten)}|{seed}",
                          lambda dim=dim, whiten=whiten, seed=seed: cell(dim, whiten, seed)) for seed in seeds]
        values[cell_name(dim, whiten)] = float(np.mean(nmis))
    return {"rows": n, "dim": width, "k": k, "auto": cell_name(auto, True), "cells": values}


def print_table(title: str, rows: list[tuple[str, dict]], columns: Callable[[dict], list[tuple[str, str]]]) -> float:
    """One line per feature set; `columns(row)` gives (header, cell name) pairs. Returns the worst auto/best."""
    print(f"\n{title}")
    headers = [header for header, _ in columns(rows[0][1])]
    head = f"{'features':38} {'N':>6} {'D':>5} {'k':>3} " + " ".join(f"{h:>6}" for h in headers)
    head += "   auto    NMI  /best"
    print(head)
    print("-" * len(head))
    worst = 1.0
    for name, row in rows:
        cells = row["cells"]
        best = max(cells.values())
        ratio = cells[row["auto"]] / best if best > 0 else 1.0
        worst = min(worst, ratio)
        shown = " ".join(f"{cells[c]:6.3f}" if c in cells else f"{'-':>6}" for _, c in columns(row))
        print(f"{name:38} {row['rows']:>6} {row['dim']:>5} {row['k']:>3} {shown} {row['auto']:>6} "
              f"{cells[row['auto']]:6.3f} {ratio:6.2f}")
    return worst


def part_a_columns(row: dict) -> list[tuple[str, str]]:
    return [("0", "0")] + [(cell_name(d, w), cell_name(d, w)) for d in DIMS[1:] for w in (True, False)]


def part_b_columns(row: dict) -> list[tuple[str, str]]:
    k = row["k"]
    return [("0", "0")] + [(label, cell_name(d, True)) for label, d in
                           (("k-1", k - 1), ("2(k-1)", 2 * (k - 1)), ("2k", 2 * k), ("4k", 4 * k))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "pca-default", help="images, features, cache")
    parser.add_argument("--seeds", default="0,1,2", help="k-means seeds; the tables show the mean NMI")
    parser.add_argument("--quick", action="store_true", help="a few cheap feature sets (under a minute)")
    parser.add_argument("--large", action="store_true", help="add 60,000 Fashion-MNIST pixel rows to part A")
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss threads")
    parser.add_argument("--json", type=Path, help="also write both tables here")
    args = parser.parse_args()
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = Cache(args.work / "results.json")
    have_fmnist = Path(FMNIST).exists()
    if not have_fmnist:
        print(f"Fashion-MNIST rows skipped: no {FMNIST} (apt-get install dataset-fashion-mnist)", file=sys.stderr)

    def run(feature_set: FeatureSet, cells: list[tuple[int, bool]]) -> tuple[str, dict]:
        began = time.perf_counter()
        row = measure(feature_set, cells, args.work, seeds, cache)
        print(f"{feature_set.name}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
        return feature_set.name, row

    part_a = (PART_A_QUICK if args.quick else PART_A) + ([FeatureSet(FM60K)] if args.large else [])
    grid = [(0, False)] + [(d, w) for d in DIMS[1:] for w in (True, False)]
    rows_a = [run(f, grid) for f in part_a if have_fmnist or not f.images.fmnist_limit]
    rows_b = []
    for classes in PART_B_CLASSES if not args.quick else [c for c in PART_B_CLASSES if c <= 6]:
        for net in PART_B_NETS if not args.quick else (SMALL_NET,):
            feature_set = FeatureSet(toy(600, classes, 0), **net)
            dims = [(0, False)] + [(d, True) for d in (classes - 1, 2 * (classes - 1), 2 * classes, 4 * classes)]
            rows_b.append(run(feature_set, dims))
    worst_a = print_table("A: --pca-dim (w = whitened, as an explicit --pca-dim does; plain = PCA without whitening; "
                          "0 = no PCA)", rows_a, part_a_columns)
    worst_b = print_table("B: whitened dimension against the number of clusters k (= classes), 600 rows",
                          rows_b, part_b_columns)
    print(f"\nworst auto/best: A {worst_a:.2f}, B {worst_b:.2f} (mean NMI over k-means seeds {args.seeds})")
    if args.json:
        args.json.write_text(json.dumps({"A": dict(rows_a), "B": dict(rows_b)}, indent=1))


if __name__ == "__main__":
    main()
