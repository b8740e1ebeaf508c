"""How close do the stages come to the bare libraries they wrap?

Prints, measured in one run on this machine, each stage against a bare baseline run in the same
process on the same data (machines are noisy: the ratios are what we report):

  1 extract       images/s of `ssl extract` / images/s of the bare network's forward pass on the same
                  batches, already decoded and in memory (target >= 0.9; the gap is decoding,
                  DataLoader and HDF5 overhead); once per --workers value; and the decoding alone
  2 cluster       seconds of `ssl cluster --pca-dim 0` on L2-normalised features / seconds of a bare
                  faiss.Kmeans.train on the same array in memory (target <= 1.1); the same over bare
                  faiss plus the one search that assigns every row to the final centroids (bare
                  faiss gives no assignments); also the stage with PCA, scikit-learn's Lloyd k-means
                  and the torch backend against bare faiss
  3 k-means flops GFLOP/s of faiss k-means (2 N_train k d niter) / GFLOP/s of a plain float32
                  x @ c.T of the same shapes
  4 pseudolabel   rows/s of `ssl pseudolabel` / rows/s of a bare faiss IndexFlatL2 search (top 2)
                  (target >= 0.8); then what the stage adds to the search (reading and normalising
                  the features, copying the sample ids, scoring), each timed alone, over the search
  5 peak RSS      ru_maxrss of extract and of pseudolabel, each in a fresh interpreter, at N and 4N
                  rows (target: flat, ratio ~1.0)

    python bench/stages.py                   # default sizes, ~9 minutes on 2 quiet cores
    python bench/stages.py --quick           # smaller sizes, ~1 minute
    python bench/stages.py --n 200000 --json stages.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from ssl_cli.artifacts.h5 import H5Artifact, RowWriter
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.clustering.metrics import cluster_quality
from ssl_cli.clustering.preprocess import preprocess
from ssl_cli.clustering.stream import chunk_rows_for, reduce_streamed
from ssl_cli.config import ClusterConfig, ExtractConfig, PseudolabelConfig
from ssl_cli.data.dataset import SourceDataset
from ssl_cli.data.sources import open_source
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.data.transforms import eval_transform
from ssl_cli.models.network import network_from_arch
from ssl_cli.models.registry import build_model
from ssl_cli.stages import cluster, extract, pseudolabel

ARCH = "resnet18_lowres"
IMAGE_SIZE = 32
TOY_CLASSES = 10
# `ssl extract` in the RSS runs reads conv1 average-pooled to 8 x 8: 64 x 8 x 8 = 4096-d rows, so
# the 4N run's whole feature array (4N x 16 KiB) would stand out in the RSS if it were held, while
# the cheap truncated network keeps those runs short.
RSS_LAYER, RSS_POOL_SIZE = "conv1", 8
RSS_DIM = 256  # width of the pseudolabel RSS features: 4 x 100k x 256 x 4 B = 400 MB if loaded whole


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = run()
    return time.perf_counter() - began, result


# Largest max/min ratio of repeated timings seen in this run: a noisy machine shows up here.
SPREAD: dict[str, float] = {}


def best_of(seconds: dict[Any, list[float]], label: str) -> dict[Any, float]:
    """The fastest of each list of repeated timings, recording the spread.

    The minimum, not the median: other processes on a shared machine only ever add time, so the
    fastest repeat is the one closest to what the code costs (the reasoning of Python's timeit).
    """
    for name, values in seconds.items():
        SPREAD[f"{label} {name}".strip()] = max(values) / min(values)
    return {name: min(values) for name, values in seconds.items()}


def interleaved_best(runs: dict[str, Callable[[], Any]], repeats: int, label: str = "") -> dict[str, float]:
    """Fastest seconds of each callable, the callables taking turns so drift hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run)[0])
    return best_of(seconds, label)


class Fresh:
    """Numbered paths in a folder: every stage run writes a new file, so none is skipped as up to date."""

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0

    def __call__(self, stem: str) -> Path:
        self.count += 1
        return self.folder / f"{stem}-{self.count}.h5"


# -- 1. extract ------------------------------------------------------------------------------------


def decoded_batches(folder: Path, batch_size: int) -> list[torch.Tensor]:
    """Every image of `folder` through the stage's own eval transform: a list of (B, 3, S, S) float32."""
    network = network_from_arch(ARCH, None, None, 0)
    transform = eval_transform(network.input_size, network.mean, network.std, network.per_image_normalise)
    dataset = SourceDataset(open_source(str(folder)), transform)
    images = [dataset[i][0] for i in range(len(dataset))]
    return [torch.stack(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]


def bare_forward_seconds(batches: list[torch.Tensor]) -> float:
    """Seconds for the bare network's forward pass over `batches`, after one warm-up batch."""
    torch.manual_seed(0)
    model = build_model(ARCH).eval()
    with torch.inference_mode():
        model(batches[0])
        began = time.perf_counter()
        for images in batches:
            model(images)
        return time.perf_counter() - began


def decode_seconds(folder: Path) -> float:
    """Seconds to decode and eval-transform every image of `folder` in this one process."""
    network = network_from_arch(ARCH, None, None, 0)
    transform = eval_transform(network.input_size, network.mean, network.std, network.per_image_normalise)
    dataset = SourceDataset(open_source(str(folder)), transform)
    return timed(lambda: [dataset[i] for i in range(len(dataset))])[0]


def extract_rows(folder: Path, n_images: int, worker_counts: list[int], batch_size: int, repeats: int,
                 fresh: Fresh) -> list[dict]:
    batches = decoded_batches(folder, batch_size)
    seconds: dict[Any, list[float]] = {"bare": [], **{workers: [] for workers in worker_counts}}
    loop_rates: dict[int, list[float]] = {workers: [] for workers in worker_counts}
    for _ in range(repeats):  # the bare pass and the stage runs take turns, so drift hits all alike
        seconds["bare"].append(bare_forward_seconds(batches))
        for workers in worker_counts:
            cfg = ExtractConfig(data=str(folder), arch=ARCH, layer="pool", out=fresh("features"),
                                batch_size=batch_size, workers=workers, progress=False)
            took, result = timed(functools.partial(extract.run, cfg))
            seconds[workers].append(took * n_images / result.summary["rows"])
            with H5Artifact(result.out, "features") as features:
                loop_rates[workers].append(float(features.attrs["images_per_second"]))
    best = best_of(seconds, "extract")
    bare_rate = n_images / best["bare"]
    rows = []
    for workers in worker_counts:
        rate, loop_rate = n_images / best[workers], max(loop_rates[workers])
        rows.append(row("1 extract", f"images/s, workers={workers} (whole stage)", rate, bare_rate, rate / bare_rate,
                        ">= 0.9", "img/s"))
        rows.append(row("1 extract", f"images/s, workers={workers} (batch loop only)", loop_rate, bare_rate,
                        loop_rate / bare_rate, "", "img/s"))
    # What the stage adds per image: PNG decode + transform, here in one process (workers spread it)
    decode_rate = n_images / decode_seconds(folder)
    rows.append(row("1 extract", "images/s, decode + eval transform alone (1 process)", decode_rate, bare_rate,
                    decode_rate / bare_rate, "", "img/s"))
    return rows


# -- 2, 3. cluster -----------------------------------------------------------------------------------


def gaussian_mixture(n: int, d: int, centers: int, seed: int, normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 points around `centers` random means, and their (n,) int64 component ids."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, d), dtype=np.float32)
    targets = rng.integers(0, centers, n)
    x = means[targets] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, targets.astype(np.int64)


def write_features(path: Path, x: np.ndarray, targets: np.ndarray, seed: int) -> Path:
    """A features artifact as `ssl extract` would write it, from x: (N, d) float32 and targets: (N,)."""
    provenance = make_provenance("features", "bench", {}, {"seed": seed, "rows": len(x), "dim": x.shape[1]}, [])
    writer = RowWriter.create(path, provenance, columns={
        "features": ((x.shape[1],), "float32"), "sample_ids": ((), str), "targets": ((), np.int64)})
    block = 65536
    for start in range(0, len(x), block):
        end = min(start + block, len(x))
        writer.append(features=x[start:end], sample_ids=np.array([f"row{i}" for i in range(start, end)], dtype=object),
                      targets=targets[start:end])
    return writer.commit()


def bare_faiss_kmeans(x: np.ndarray, k: int, niter: int) -> faiss.Kmeans:
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=0, max_points_per_centroid=256)
    kmeans.train(x)
    return kmeans


def bare_sklearn_kmeans(x: np.ndarray, k: int, niter: int) -> KMeans:
    return KMeans(n_clusters=k, algorithm="lloyd", max_iter=niter, n_init=1, init="random", tol=0,
                  random_state=0).fit(x)


def matmul_gflops(x: np.ndarray, k: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of a plain float32 (N, d) @ (d, k) product, numpy and torch, best of `repeats`."""
    centroids = np.random.default_rng(1).standard_normal((k, x.shape[1]), dtype=np.float32)
    x_torch, centroids_torch = torch.from_numpy(x), torch.from_numpy(centroids)
    x @ centroids.T, x_torch @ centroids_torch.T  # warm-up
    seconds = interleaved_best({"numpy": lambda: x @ centroids.T, "torch": lambda: x_torch @ centroids_torch.T},
                               repeats, "matmul")
    flops = 2 * x.shape[0] * k * x.shape[1]
    return {name: flops / value / 1e9 for name, value in seconds.items()}


def cluster_rows(folder: Path, n: int, d: int, k: int, niter: int, repeats: int,
                 fresh: Fresh) -> tuple[list[dict], Path, Path]:
    x, targets = gaussian_mixture(n, d, k, seed=0, normalise=True)
    features = write_features(folder / "features-cluster.h5", x, targets, seed=0)
    bare_faiss_kmeans(x[: 20 * 64], 20, 2)  # warm-up: OpenMP threads, first allocations

    def stage(**options: Any) -> Any:
        return cluster.run(ClusterConfig(features=features, k=k, niter=niter, seed=0, out=fresh("clusters"),
                                         progress=False, **options))

    trained: list[faiss.Kmeans] = []
    seconds = interleaved_best({"faiss": lambda: trained.append(bare_faiss_kmeans(x, k, niter)),
                                "stage": lambda: stage(pca_dim=0)}, repeats, "cluster")
    bare = seconds["faiss"]
    # faiss.Kmeans.train returns centroids, not assignments: the stage's one search of every row
    # against the final centroids (its `assignments`, `distances`) is an iteration bare faiss skips.
    search = interleaved_best({"search": lambda: trained[-1].index.search(x, 1)}, repeats,
                              "cluster assign")["search"]
    clusters = stage(pca_dim=0).out  # kept for pseudolabel; untimed
    pca_dim = 256 if d >= 256 else d // 2
    pca_seconds, _ = timed(lambda: stage(pca_dim=pca_dim))
    torch_seconds, _ = timed(lambda: stage(pca_dim=0, backend="torch"))
    sklearn_seconds, _ = timed(lambda: bare_sklearn_kmeans(x, k, niter))
    # faiss's OpenMP threads spin-wait while its OpenBLAS threads want the same cores
    with threadpool_limits(1, user_api="blas"):
        one_blas_seconds, _ = timed(lambda: bare_faiss_kmeans(x, k, niter))
    n_train = min(n, k * 256)
    faiss_gflops = 2 * n_train * k * d * niter / bare / 1e9
    matmul = matmul_gflops(x[:n_train], k, repeats)
    faster = "faiss" if bare < sklearn_seconds else "scikit-learn"
    rows = [
        row("2 cluster", "s, stage pca_dim=0 / bare faiss.Kmeans", seconds["stage"], bare, seconds["stage"] / bare,
            "<= 1.1", "s"),
        row("2 cluster", "s, stage pca_dim=0 / bare faiss.Kmeans + its assignment search", seconds["stage"],
            bare + search, seconds["stage"] / (bare + search), "", "s"),
        row("2 cluster", f"s, the assignment search alone / bare faiss.Kmeans ({niter} iterations)", search, bare,
            search / bare, "", "s"),
        row("2 cluster", f"s, stage pca_dim={pca_dim} / bare faiss", pca_seconds, bare, pca_seconds / bare, "", "s"),
        row("2 cluster", f"s, sklearn KMeans lloyd / bare faiss ({faster} faster)", sklearn_seconds, bare,
            sklearn_seconds / bare, "", "s"),
        row("2 cluster", "s, stage backend=torch / bare faiss", torch_seconds, bare, torch_seconds / bare, "", "s"),
        row("2 cluster", "s, bare faiss with 1 BLAS thread / bare faiss", one_blas_seconds, bare,
            one_blas_seconds / bare, "", "s"),
        row("3 flops", "GFLOP/s, faiss k-means / numpy x @ c.T", faiss_gflops, matmul["numpy"],
            faiss_gflops / matmul["numpy"], "", "GFLOP/s"),
        row("3 flops", "GFLOP/s, faiss k-means / torch x @ c.T", faiss_gflops, matmul["torch"],
            faiss_gflops / matmul["torch"], "", "GFLOP/s"),
    ]
    return rows, features, clusters


# -- 4. pseudolabel -----------------------------------------------------------------------------------


def pseudolabel_rows(features: Path, clusters: Path, repeats: int, fresh: Fresh) -> list[dict]:
    with H5Artifact(features, "features") as artifact:
        x = preprocess(artifact.array("features"), None)  # the clusters were fitted without PCA
    with H5Artifact(clusters, "clusters") as artifact:
        centroids = artifact.array("centroids").astype(np.float32)

    def bare_search() -> None:
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        index.search(x, 2)

    written: list[Path] = []

    def stage() -> None:
        written.append(pseudolabel.run(PseudolabelConfig(clusters=clusters, features=features, out=fresh("labels"),
                                                         progress=False)).out)

    bare_search()  # warm-up
    seconds = interleaved_best({"faiss": bare_search, "stage": stage}, repeats, "pseudolabel")
    stage_rate, bare_rate = len(x) / seconds["stage"], len(x) / seconds["faiss"]
    rows = [row("4 pseudolabel", f"rows/s, stage / bare faiss search (k={len(centroids)})", stage_rate, bare_rate,
                stage_rate / bare_rate, ">= 0.8", "rows/s")]
    # What the stage does besides the search, each timed alone, as a share of the bare search
    parts = interleaved_best(labelling_parts(features, written[-1], fresh), repeats, "pseudolabel part")
    for what, took in parts.items():
        rows.append(row("4 pseudolabel", f"s, {what} / bare faiss search", took, seconds["faiss"],
                        took / seconds["faiss"], "", "s"))
    return rows


def labelling_parts(features: Path, written: Path, fresh: Fresh) -> dict[str, Callable[[], Any]]:
    """The work `ssl pseudolabel` must do around its search, each piece on its own (`written`: its output)."""
    with H5Artifact(written, "labels") as artifact:
        targets, labels = artifact.array("targets"), artifact.array("labels")

    def read_and_normalise() -> None:
        with H5Artifact(features, "features") as artifact:
            reduce_streamed(artifact, None, chunk_rows_for(artifact, None))

    def copy_ids() -> None:
        provenance = make_provenance("labels", "bench", {}, {}, [])
        writer = RowWriter.create(fresh("ids"), provenance, {"sample_ids": ((), str)}, chunk_rows=65536)
        with H5Artifact(features, "features") as artifact:
            writer.append(sample_ids=artifact["sample_ids"][...])
        writer.commit()

    return {"read + L2-normalise the features": read_and_normalise, "copy the sample ids into labels.h5": copy_ids,
            "quality (NMI, ARI, accuracies)": lambda: cluster_quality(targets, labels)}


# -- 5. peak RSS ------------------------------------------------------------------------------------------

CHILD_PRELUDE = """
import json, resource, sys
from pathlib import Path
import faiss, torch
torch.set_num_threads({threads})
from ssl_cli.config import ExtractConfig, PseudolabelConfig
from ssl_cli.stages import extract, pseudolabel
# Importing torch peaks above where it settles; resetting the high-water mark (Linux >= 4.0) keeps
# that transient out, so the peak below is the stage's run on top of the resident imports.
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
except OSError:
    pass
with open("/proc/self/status") as handle:
    settled = int(handle.read().split("VmRSS:")[1].split()[0])
"""
CHILD_EPILOGUE = """
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "imports_kib": settled}))
"""


def child_peak_rss(body: str, threads: int) -> dict[str, int]:
    """Peak RSS (KiB) of a fresh interpreter that imports the stages and runs `body`.

    The interpreter is started by a shell, not directly: a process exec'd straight from this one
    inherits this one's RSS high-water mark in ru_maxrss (Linux keeps the pre-exec peak), which
    here holds the benchmark's arrays and would hide the child's own figure.
    """
    code = CHILD_PRELUDE.format(threads=threads) + body + CHILD_EPILOGUE
    done = subprocess.run(["/bin/sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, code],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extract_rss_body(folder: Path, out: Path) -> str:
    return (f"extract.run(ExtractConfig(data={str(folder)!r}, arch={ARCH!r}, layer={RSS_LAYER!r}, "
            f"pool_size={RSS_POOL_SIZE}, out=Path({str(out)!r}), batch_size=128, workers=2, progress=False))")


def pseudolabel_rss_body(clusters: Path, features: Path, out: Path) -> str:
    return (f"pseudolabel.run(PseudolabelConfig(clusters=Path({str(clusters)!r}), features=Path({str(features)!r}), "
            f"out=Path({str(out)!r}), progress=False))")


def rss_pair(figure: str, what: str, small: dict[str, int], large: dict[str, int]) -> list[dict]:
    """Rows for peak RSS at 4N against N: the whole process, and the part above the resident imports."""
    above = [run["peak_kib"] - run["imports_kib"] for run in (small, large)]
    return [
        row(figure, f"MiB peak, {what}", large["peak_kib"] / 1024, small["peak_kib"] / 1024,
            large["peak_kib"] / small["peak_kib"], "~1.0 (flat)", "MiB"),
        row(figure, f"MiB peak above imports ({small['imports_kib'] // 1024} MiB), same runs", above[1] / 1024,
            above[0] / 1024, above[1] / max(above[0], 1), "", "MiB"),
    ]


def rss_rows(folder: Path, n_images: int, n: int, threads: int, fresh: Fresh) -> list[dict]:
    image_runs = []
    for count in (n_images, 4 * n_images):
        images = folder / f"rss-toy-{count}"
        write_toy_folder(images, count, TOY_CLASSES, IMAGE_SIZE, seed=0)
        image_runs.append(child_peak_rss(extract_rss_body(images, fresh("rss-features")), threads))
    rows = rss_pair("5 peak RSS", f"extract {RSS_LAYER} 4096-d: {4 * n_images} / {n_images} images", *image_runs)

    feature_paths = []
    for count, seed in ((n, 1), (4 * n, 2)):
        x, targets = gaussian_mixture(count, RSS_DIM, 100, seed=seed, normalise=False)
        feature_paths.append(write_features(folder / f"rss-features-{count}.h5", x, targets, seed=seed))
        del x, targets
    # Clusters fitted on the N rows with the default PCA, so pseudolabel also projects every chunk.
    clusters = cluster.run(ClusterConfig(features=feature_paths[0], k=100, niter=5, seed=0, out=fresh("rss-clusters"),
                                         progress=False)).out
    label_runs = [child_peak_rss(pseudolabel_rss_body(clusters, path, fresh("rss-labels")), threads)
                  for path in feature_paths]
    chunk = PseudolabelConfig.model_fields["chunk_rows"].default
    rows += rss_pair("5 peak RSS", f"pseudolabel {RSS_DIM}-d, chunk_rows {chunk}: {4 * n} / {n} rows", *label_runs)
    return rows


# -- table ----------------------------------------------------------------------------------------------------


def row(figure: str, what: str, measured: float, baseline: float | None, ratio: float | None, target: str,
        unit: str) -> dict:
    return {"figure": figure, "what": what, "measured": measured, "baseline": baseline, "ratio": ratio,
            "target": target, "unit": unit}


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def print_table(rows: list[dict]) -> None:
    width = max(len(item["what"]) for item in rows)
    header = "what (measured / baseline)"
    print(f"{'figure':<14} {header:<{width}} {'measured':>10} {'baseline':>10} {'ratio':>7}  target")
    for item in rows:
        ratio = "-" if item["ratio"] is None else f"{item['ratio']:.2f}"
        print(f"{item['figure']:<14} {item['what']:<{width}} {number(item['measured']):>10} "
              f"{number(item['baseline']):>10} {ratio:>7}  {item['target']}")


LAPS: dict[str, float] = {}


def lap(name: str, since: float) -> float:
    now = time.perf_counter()
    LAPS[name] = now - since
    return now


def sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the sizes --quick or the defaults imply, keeping any the user gave."""
    quick = {"n": 20_000, "k": 200, "images": 256, "rss_images": 250, "repeats": 1}
    full = {"n": 100_000, "k": 1000, "images": 1000, "rss_images": 1000, "repeats": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rss_rows is None:
        args.rss_rows = args.n
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about a minute on 2 cores")
    parser.add_argument("--n", type=int, help="feature rows for cluster, pseudolabel and the RSS runs (default 100000)")
    parser.add_argument("--d", type=int, default=128, help="feature dimension for cluster and pseudolabel")
    parser.add_argument("--k", type=int, help="clusters (default 1000, quick 200)")
    parser.add_argument("--niter", type=int, default=20, help="k-means iterations")
    parser.add_argument("--images", type=int, help="toy images for the extract throughput (default 1000)")
    parser.add_argument("--rss-images", type=int, help="N for the extract RSS runs (N and 4N images; default 1000)")
    parser.add_argument("--rss-rows", type=int, help="N for the pseudolabel RSS runs (default: --n)")
    parser.add_argument("--workers", default="2,0", help="comma-separated DataLoader worker counts for extract")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, help="repeats of every timing but the RSS runs; the fastest is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch, faiss, BLAS and OpenMP threads")
    parser.add_argument("--skip", default="", help="comma-separated figures to skip: extract,cluster,pseudolabel,rss")
    parser.add_argument("--json", type=Path, help="also save the figures to this file")
    args = sizes(parser.parse_args())
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    began = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ssl-bench-") as tmp, threadpool_limits(args.threads):
        folder, fresh = Path(tmp), Fresh(Path(tmp))
        section = time.perf_counter()
        if "extract" not in skip:
            images = folder / "toy"
            write_toy_folder(images, args.images, TOY_CLASSES, IMAGE_SIZE, seed=0)
            workers = [int(value) for value in args.workers.split(",")]
            rows += extract_rows(images, args.images, workers, args.batch_size, args.repeats, fresh)
            section = lap("extract", section)
        if not {"cluster", "pseudolabel"} <= skip:
            cluster_figures, features, clusters = cluster_rows(folder, args.n, args.d, args.k, args.niter,
                                                               args.repeats, fresh)
            rows += cluster_figures if "cluster" not in skip else []
            if "pseudolabel" not in skip:
                rows += pseudolabel_rows(features, clusters, args.repeats, fresh)
            section = lap("cluster + pseudolabel", section)
        if "rss" not in skip:
            rows += rss_rows(folder, args.rss_images, args.rss_rows, args.threads, fresh)
            lap("peak RSS", section)
    wall = time.perf_counter() - began
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs; threads {args.threads} "
          f"(torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}); torch {torch.__version__}, faiss {faiss.__version__}")
    print(f"sizes: extract {args.images} images {IMAGE_SIZE} px, {ARCH} pool, batch {args.batch_size}; "
          f"cluster N={args.n} d={args.d} k={args.k} niter={args.niter}; repeats {args.repeats} (fastest); "
          f"RSS N={args.rss_images} images / {args.rss_rows} rows")
    print_table(rows)
    if SPREAD:
        print("spread (max/min of the repeats): " + ", ".join(f"{name} {value:.2f}" for name, value in SPREAD.items()))
    print("seconds per section: " + ", ".join(f"{name} {value:.0f}" for name, value in LAPS.items())
          + f"; wall time {wall:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {key: str(value) for key, value in vars(args).items()},
                                         "wall_s": wall, "sections_s": LAPS, "spread": SPREAD, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
