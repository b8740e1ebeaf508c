"""Which `ssl cluster --pca-dim` holds from hundreds to millions of rows? (issue 11)

For each feature set (toy images and Fashion-MNIST subsets of several sizes; raw pixels and layers
of randomly initialised resnet18 / resnet18_lowres / alexnet_lowres), k-means with k = the number
of classes runs after the stage's own preprocessing (PCA fitted on every row, optional whitening,
L2) for every --pca-dim in {0, 16, 32, 64, 128, 256}, whitened and not, and the table prints the
NMI against the true classes (mean over --seeds k-means seeds). The `auto` column is what
`--pca-dim auto` (``ssl_cli.clustering.preprocess.auto_pca``) picks for that set, and `auto/best` its
NMI over the best cell of the row: the default is meant to stay >= 0.9 everywhere.

Resumable: images and features are ssl artifacts in --work (a stage whose output is up to date is
skipped) and every (set, dim, whitening, seed) NMI is cached in --work/results.json, so an
interrupted run continues and a re-run only prints. About 3 minutes on 2 quiet cores, most of it
feature extraction; --quick keeps the 600-row toy set and the pixel sets only (well under a minute).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_cli.artifacts.h5 import H5Artifact  # noqa: E402
from ssl_cli.clustering.kmeans import nearest_centroids, train_kmeans  # noqa: E402
from ssl_cli.clustering.metrics import nmi  # noqa: E402
from ssl_cli.clustering.preprocess import PCA, auto_pca, fit_pca, preprocess  # noqa: E402
from ssl_cli.config import ExtractConfig, PackConfig  # noqa: E402
from ssl_cli.data.toy import write_toy_folder  # noqa: E402
from ssl_cli.stages import extract, pack  # noqa: E402

DIMS = (0, 16, 32, 64, 128, 256)
FMNIST = "/usr/share/datasets/fashion-mnist"
NITER = 20  # the stage's default


@dataclass(frozen=True)
class ImageSet:
    name: str
    toy_n: int = 0  # toy-data images (6 classes, 32 px), or
    fmnist_limit: int = 0  # the first N images of Fashion-MNIST's training split
    toy_seed: int = 0


@dataclass(frozen=True)
class FeatureSet:
    images: ImageSet
    arch: str | None = None  # None: raw pixels in [0, 1], flattened
    layer: str | None = None
    image_size: int = 32

    @property
    def name(self) -> str:
        kind = "pixels" if self.arch is None else f"{self.arch}:{self.layer}@{self.image_size}"
        return f"{self.images.name} {kind}"


TOY600 = ImageSet("toy600", toy_n=600, toy_seed=0)
TOY6000 = ImageSet("toy6000", toy_n=6000, toy_seed=1)
FM1K = ImageSet("fmnist1k", fmnist_limit=1000)
FM2K = ImageSet("fmnist2k", fmnist_limit=2000)
FM10K = ImageSet("fmnist10k", fmnist_limit=10_000)
FM60K = ImageSet("fmnist60k", fmnist_limit=60_000)

FULL = [
    FeatureSet(TOY600), FeatureSet(TOY600, "resnet18", "pool"), FeatureSet(TOY600, "resnet18_lowres", "layer2"),
    FeatureSet(TOY600, "alexnet_lowres", "conv2"), FeatureSet(TOY600, "alexnet_lowres", "conv5"),
    FeatureSet(TOY600, "alexnet_lowres", "fc7"),
    FeatureSet(TOY6000), FeatureSet(TOY6000, "resnet18", "pool"), FeatureSet(TOY6000, "alexnet_lowres", "conv5"),
    FeatureSet(FM1K), FeatureSet(FM2K, "alexnet_lowres", "conv5"), FeatureSet(FM10K), FeatureSet(FM60K),
]
QUICK = [FeatureSet(TOY600), FeatureSet(TOY600, "resnet18", "pool"), FeatureSet(TOY6000), FeatureSet(FM1K),
         FeatureSet(FM10K)]


def images_h5(image_set: ImageSet, work: Path) -> Path:
    """The set packed into one images .h5 (toy images rendered to a folder first)."""
    out = work / f"{image_set.name}.h5"
    if image_set.toy_n:
        folder = work / image_set.name
        write_toy_folder(folder, n=image_set.toy_n, classes=6, size=32, seed=image_set.toy_seed)
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
            return (pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0), artifact.array("targets")
    out = work / f"{feature_set.images.name}-{feature_set.arch}-{feature_set.layer}-{feature_set.image_size}.h5"
    extract.run(ExtractConfig(data=str(images), out=out, arch=feature_set.arch, layer=feature_set.layer,
                              image_size=feature_set.image_size, batch_size=250, workers=0, progress=False,
                              device="cpu"))
    with H5Artifact(out, "features") as artifact:
        return artifact.array("features").astype(np.float32), artifact.array("targets")


def nmi_after(x: np.ndarray, targets: np.ndarray, pca: PCA | None, seed: int) -> float:
    """NMI of k-means (k = classes, the stage's defaults) on PCA-projected, L2-normalised rows."""
    reduced = preprocess(x, pca)
    k = int(targets.max()) + 1
    result = train_kmeans(reduced, k, NITER, seed, 256, "faiss", gpu="off")
    _, ids = nearest_centroids(reduced, result.centroids, 1, "faiss")
    return nmi(targets, ids[:, 0])


def truncated(pca: PCA, dim: int) -> PCA:
    """The first `dim` axes of a fitted PCA: the same as fitting at `dim` (eigenvectors are nested)."""
    return PCA(pca.mean, pca.components[:dim], pca.scale[:dim])


def measure(feature_set: FeatureSet, work: Path, seeds: list[int], cache: dict, save) -> dict:
    """{'rows', 'dim', 'cells': {'0', '16w', '16', ...: mean NMI}, 'auto': (dim, whiten, NMI)}."""
    x, targets = load_features(feature_set, work)
    n, width = x.shape
    auto_dim, auto_whiten = auto_pca(n, width)
    wanted = [(0, False)] + [(d, w) for d in DIMS[1:] if d <= min(width, n - 1) for w in (True, False)]
    if (auto_dim, auto_whiten) not in wanted:
        wanted.append((auto_dim, auto_whiten))
    fitted: dict[bool, PCA] = {}
    cells: dict[str, float] = {}
    for dim, whiten in wanted:
        values = []
        for seed in seeds:
            key = f"{feature_set.name}|{dim}|{'w' if whiten else 'p'}|{seed}"
            if key not in cache:
                if dim and whiten not in fitted:
                    fitted[whiten] = fit_pca(x, min(max(max(DIMS), auto_dim), width, n - 1), whiten=whiten)
                cache[key] = nmi_after(x, targets, truncated(fitted[whiten], dim) if dim else None, seed)
                save()
            values.append(cache[key])
        cells[cell_name(dim, whiten)] = float(np.mean(values))
    return {"rows": n, "dim": width, "cells": cells,
            "auto": (auto_dim, auto_whiten, cells[cell_name(auto_dim, auto_whiten)])}


def cell_name(dim: int, whiten: bool) -> str:
    return "0" if dim == 0 else f"{dim}{'w' if whiten else ''}"


def print_table(rows: list[tuple[str, dict]]) -> None:
    columns = ["0"] + [f"{d}{suffix}" for d in DIMS[1:] for suffix in ("w", "")]
    head = f"{'features':34} {'N':>6} {'D':>5} " + " ".join(f"{c:>5}" for c in columns) + "   auto   NMI  /best"
    print(head)
    print("-" * len(head))
    worst = 1.0
    for name, row in rows:
        cells = row["cells"]
        best = max(cells.values())
        auto_dim, auto_whiten, auto_nmi = row["auto"]
        ratio = auto_nmi / best if best > 0 else 1.0
        worst = min(worst, ratio)
        values = " ".join(f"{cells[c]:5.3f}" if c in cells else f"{'-':>5}" for c in columns)
        print(f"{name:34} {row['rows']:>6} {row['dim']:>5} {values}  {cell_name(auto_dim, auto_whiten):>5} "
              f"{auto_nmi:5.3f} {ratio:5.2f}")
    print(f"\ncolumns: --pca-dim (w = whitened, as the stage did before auto; plain = PCA without whitening); "
          f"0 = no PCA\nworst auto/best: {worst:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "pca-default", help="images, features, cache")
    parser.add_argument("--seeds", default="0,1,2", help="k-means seeds; the table shows the mean NMI")
    parser.add_argument("--quick", action="store_true", help="toy600 and pixel sets only (< 1 minute)")
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss / BLAS threads")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    cache_path = args.work / "results.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    def save() -> None:
        cache_path.with_suffix(".partial").write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(cache_path.with_suffix(".partial"), cache_path)

    rows = []
    for feature_set in QUICK if args.quick else FULL:
        if feature_set.images.fmnist_limit and not Path(FMNIST).exists():
            print(f"skipped {feature_set.name}: no {FMNIST} (apt-get install dataset-fashion-mnist)", file=sys.stderr)
            continue
        began = time.perf_counter()
        rows.append((feature_set.name, measure(feature_set, args.work, seeds, cache, save)))
        print(f"{feature_set.name}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
