"""SCAN's neighbour mining at scale (issue 25): exact against faiss indexes, and IVF up to ImageNet's row count.

  sample  20,000 rows of real-looking 256-d features (Fashion-MNIST training pixels, PCA to 256 dimensions
          fitted on those rows; a 2000-component Gaussian mixture when the dataset is missing): exact, ivf
          and hnsw as `ssl cluster --method scan --neighbours-method` runs them (`search_neighbours`,
          K = 20), build and search seconds, recall@20 of every row against exact.
  scale   IVF mining of a clustered synthetic set (a Gaussian mixture of 2000 components, 256-d; uniform
          random vectors are an index's worst case and nothing like features) at N = 80k, 320k and 1.28M:
          seconds to build (sample k-means, add), calibrate nprobe and search every row; recall@20 on 500
          held-out rows against exact; and what exact mining would take, timed on 1,000 query rows and
          scaled by N.

Rows go to --json (default bench/neighbours.results.json) as each finishes, merged into what is there, so
the 1.28M row can run on its own in the background:

    python bench/neighbours.py                       # sample + scale at 80k and 320k (about 5 min on 2 cores)
    OMP_NUM_THREADS=2 nohup python bench/neighbours.py --part scale --rows 1281167 > /tmp/nb1m.log 2>&1 &
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_cli.clustering.neighbours import exact_neighbours, recall_at_k, search_neighbours  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
K = 20
DIM = 256
COMPONENTS = 2000
# Within-component standard deviation per dimension (centres ~ N(0, 1)). In 256-d the difficulty turns sharply
# with it (80k rows): 0.9-1.2 separates the components (nprobe 1 reaches recall 0.96-0.999), 1.5 is nearly
# uniform (nprobe 384 of 800 lists at 40k rows); 1.3 needs nprobe 32 of 1131 lists, the overlapping-clusters
# regime of real features (Fashion-MNIST's 20k sample: 8 of 512).
SPREAD = 1.3
HELD_OUT = 500
EXACT_TIMED_QUERIES = 1000


def fashion_mnist_features(rows: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """(rows, 256) float32: Fashion-MNIST training pixels in [0, 1], PCA to 256 dimensions fitted on them."""
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as handle:
        pixels = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
    chosen = np.sort(np.random.default_rng(seed).choice(len(pixels), rows, replace=False))
    x = pixels[chosen].astype(np.float64) / 255
    x -= x.mean(0)
    _, vectors = np.linalg.eigh(x.T @ x)
    return (x @ vectors[:, ::-1][:, :DIM]).astype(np.float32), f"fashion-mnist train pixels, {rows} rows, PCA {DIM}"


def mixture(rows: int, seed: int = 0) -> np.ndarray:
    """(rows, 256) float32 from a Gaussian mixture of COMPONENTS components, drawn in chunks (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((COMPONENTS, DIM)).astype(np.float32)
    out = np.empty((rows, DIM), dtype=np.float32)
    for start in range(0, rows, 65536):
        stop = min(rows, start + 65536)
        out[start:stop] = centres[rng.integers(COMPONENTS, size=stop - start)]
        out[start:stop] += SPREAD * rng.standard_normal((stop - start, DIM), dtype=np.float32)
    return out


def sample_part(rows: int) -> dict:
    if (FMNIST / "train-images-idx3-ubyte.gz").exists():
        features, source = fashion_mnist_features(rows)
    else:
        features, source = mixture(rows), f"Gaussian mixture ({COMPONENTS} components), {rows} rows (no {FMNIST})"
    results = {"source": source, "rows": rows, "dim": DIM, "k": K, "methods": {}}
    began = time.perf_counter()
    exact = search_neighbours(features, K, "exact")
    results["methods"]["exact"] = {"seconds": round(time.perf_counter() - began, 2), "recall_at_20": 1.0}
    print(f"sample exact: {results['methods']['exact']['seconds']} s", flush=True)
    for method in ("ivf", "hnsw"):
        began = time.perf_counter()
        found = search_neighbours(features, K, method)
        seconds = time.perf_counter() - began
        row = {"seconds": round(seconds, 2), "recall_at_20": round(recall_at_k(found.indices, exact.indices), 4),
               **found.record}
        results["methods"][method] = row
        print(f"sample {method}: {row}", flush=True)
    return results


def scale_row(rows: int) -> dict:
    features = mixture(rows)
    began = time.perf_counter()
    found = search_neighbours(features, K, "ivf")
    seconds = time.perf_counter() - began
    held_out = np.sort(np.random.default_rng([7, rows]).choice(rows, HELD_OUT, replace=False))
    unit = F.normalize(torch.from_numpy(features), dim=1)
    truth, _ = exact_neighbours(unit, K, held_out, lambda done: None)
    timed = np.arange(EXACT_TIMED_QUERIES)
    started = time.perf_counter()
    exact_neighbours(unit, K, timed, lambda done: None)
    exact_estimate = (time.perf_counter() - started) * rows / len(timed)
    row = {"rows": rows, "dim": DIM, "k": K, "components": COMPONENTS, "spread": SPREAD, "seconds": round(seconds, 1),
           "minutes": round(seconds / 60, 2), "held_out_recall_at_20": round(recall_at_k(found.indices[held_out],
                                                                                        truth), 4),
           "exact_estimate_seconds": round(exact_estimate), "exact_estimate_hours": round(exact_estimate / 3600, 2),
           **found.record}
    print(f"scale {rows}: {row}", flush=True)
    return row


def merge(path: Path, update: dict) -> None:
    results = json.loads(path.read_text()) if path.exists() else {}
    if "scale" in update:
        rows = {row["rows"]: row for row in results.get("scale", [])}
        rows.update({row["rows"]: row for row in update.pop("scale")})
        results["scale"] = [rows[n] for n in sorted(rows)]
    results.update(update)
    path.write_text(json.dumps(results, indent=1) + "\n")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": [round(v, 1) for v in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "faiss": __import__("faiss").__version__, "cuda": torch.cuda.is_available()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "sample", "scale"], default="all")
    parser.add_argument("--sample-rows", type=int, default=20_000)
    parser.add_argument("--rows", default="80000,320000", help="comma-separated N of the scale part")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "neighbours.results.json")
    args = parser.parse_args()
    if args.part in ("all", "sample"):
        merge(args.json, {"sample": {**sample_part(args.sample_rows), "machine": machine()}})
    if args.part in ("all", "scale"):
        for rows in (int(value) for value in args.rows.split(",")):
            merge(args.json, {"scale": [{**scale_row(rows), "machine": machine()}]})


if __name__ == "__main__":
    main()
