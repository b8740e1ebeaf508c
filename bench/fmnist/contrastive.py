"""Contrastive, reconstructive and handcrafted features on Fashion-MNIST against the raw pixels (issue 13).

Every method pre-trains the same small net (alexnet_bn_lowres, width 0.25, 28 px) with `ssl pretext`
on the first --train images of the training split for --epochs epochs (the online kNN monitor on
2,000 test images in the metrics file), then one protocol reads every row the same way:

  features  `ssl extract` of the trunk's pooled map (pool5, 2 x 2 -> 256-d) for the training split
            (where the labelled images come from) and the test split (where they are scored);
            raw pixels (784-d, in [0, 1]) and the untrained net are rows like the others
  kNN       k = 20 nearest labelled images by cosine, votes weighted exp(cos / 0.07), with 100 and
            500 labels per class (the same images for every row: `few_labels`, seed 0)
  linear    multinomial logistic regression on standardised features (L-BFGS, L2 1e-3), same labels
  k-means   `ssl cluster --k 10` on the test features, NMI and Hungarian accuracy against the classes,
            with the tool's default PCA (auto: 18 whitened axes at k=10) and without PCA (--pca-dim 0)

Results go to bench/fmnist/contrastive.results.json after every row (resumable: finished `ssl`
stages are skipped because their outputs are up to date) and a table to stdout.

    python bench/fmnist/contrastive.py                           # ~10 min a method on 2 cores
    python bench/fmnist/contrastive.py --methods simclr,pixels   # some rows
    python bench/fmnist/contrastive.py --quick                   # mechanics only (2k images, 1 epoch)
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FMNIST = "/usr/share/datasets/fashion-mnist"
ARCH = ["--arch", "alexnet_bn_lowres"]
# method -> the pretext flags of its row (beyond data, epochs and the arch)
METHODS = {
    "simclr": ["--task", "simclr", "--batch-size", "256"],
    "moco2": ["--task", "moco2", "--batch-size", "256"],
    "moco2-long": ["--task", "moco2", "--batch-size", "256"],  # the same, run with a larger --epochs
    "pirl": ["--task", "pirl", "--batch-size", "128"],
    # the paper's NCE diverged at this budget (loss 52 -> 185 in 3 epochs of 5k images, at lr 2e-3 and 5e-4);
    # the InfoNCE form of the same two terms stays finite
    "pirl-infonce": ["--task", "pirl", "--task-option", "loss=infonce", "--batch-size", "128"],
    "autoencoder": ["--task", "autoencoder", "--batch-size", "128"],
    "rotation": ["--task", "rotation", "--batch-size", "128"],
    # the clustering family (issue 14): 10x over-clustering for DeepCluster and SeLa, SwAV's defaults
    "deepcluster": ["--task", "deepcluster", "--task-option", "k=100", "--batch-size", "128"],
    "sela": ["--task", "sela", "--task-option", "k=100", "--batch-size", "128"],
    # 2 small crops (15 px) instead of 6 keep its cost near simclr's on 2 cores
    "swav": ["--task", "swav", "--task-option", "small=2", "--batch-size", "256"],
    # the rest of the handcrafted family and the first versions of SimCLR and MoCo (issue 15: every --task)
    "simclr2": ["--task", "simclr2", "--batch-size", "256"],
    "moco": ["--task", "moco", "--batch-size", "256"],
    "context": ["--task", "context", "--batch-size", "128"],
    "colorization": ["--task", "colorization", "--batch-size", "128"],
    "inpainting": ["--task", "inpainting", "--batch-size", "128"],
    # 3 x 3 tiles of 15 px (the smallest input AlexNet's poolings take) from a 48 px crop of the 28 px image
    "jigsaw": ["--task", "jigsaw", "--image-size", "48", "--tile-size", "15", "--batch-size", "128"],
    "jigsawpp": ["--task", "jigsawpp", "--image-size", "48", "--tile-size", "15", "--batch-size", "128"],
    "untrained": [],
    "pixels": [],
}
LABELS_PER_CLASS = (100, 500)


def ssl(work: Path, *args: object) -> float:
    argv = [str(a) for a in args]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ssl_cli", *argv], cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: ssl {shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - began
    print(f"  {seconds:7.1f}s  ssl {shlex.join(argv)[:120]}", flush=True)
    return seconds


def read_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path) as handle:
        return handle["features"][...].astype(np.float32), handle["targets"][...].astype(np.int64)


def write_pixels(work: Path, split: str) -> Path:
    from ssl_cli.artifacts.h5 import write_arrays
    from ssl_cli.artifacts.schema import make_provenance
    from ssl_cli.data.fashion_mnist import load_split

    path = work / f"pixels-{split}.h5"
    if not path.exists():
        images, targets = load_split(Path(FMNIST), split)
        ids = np.array([f"{split}/{i:05d}" for i in range(len(images))], dtype=object)
        write_arrays(path, make_provenance("features", "bench-pixels", {}, {"split": split}, []),
                     {"features": images.reshape(len(images), -1).astype(np.float32) / 255.0, "sample_ids": ids,
                      "targets": targets.astype(np.int64)}, {})
    return path


def knn_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from ssl_cli.train.monitor import knn_scores

    votes = knn_scores(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x), 10, 20, 0.07)
    return float((votes.argmax(1) == test_y).mean())


def linear_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS, L2 1e-3."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, t = torch.from_numpy((train_x - mean) / std), torch.from_numpy((test_x - mean) / std)
    y = torch.from_numpy(train_y)
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 10)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + 1e-3 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((model(t).argmax(1).numpy() == test_y).mean())


def cluster(work: Path, features: str, name: str, pca: str) -> tuple[float, float, float]:
    out = f"{name}-clusters-pca{pca}.h5"
    ssl(work, "cluster", "--features", features, "--k", 10, "--pca-dim", pca, "--niter", 50, "--seed", 0,
        "--no-progress", "--out", out)
    with h5py.File(work / out) as handle:
        metrics = json.loads(handle.attrs["metrics"])
    return metrics["nmi"], metrics["acc_hungarian"], metrics["ari"]


def features_of(work: Path, method: str, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """(train features, test features, facts) of a row, running what is not up to date yet."""
    facts: dict = {}
    if method == "pixels":
        return write_pixels(work, "train"), write_pixels(work, "test"), facts
    if method == "untrained":
        source = [*ARCH, "--image-size", 28]
    else:
        checkpoint = f"{method}.pt"
        facts["pretext_seconds"] = ssl(work, "pretext", *METHODS[method], *ARCH, "--data", "train.h5", "--epochs",
                                       args.epochs, "--monitor-data", "monitor.h5", "--monitor-every", 1,
                                       "--no-progress", "--out", checkpoint)
        history = [json.loads(line) for line in (work / f"{method}.metrics.jsonl").read_text().splitlines()]
        facts["monitor_knn_top1"] = [round(row["knn_top1"], 4) for row in history]
        facts["train_seconds"] = round(sum(row["seconds"] for row in history), 1)
        source = ["--model", checkpoint]
    paths = []
    for split in ("train", "test"):
        out = f"{method}-{split}.h5"
        ssl(work, "extract", *source, "--data", f"fashion-mnist:{FMNIST}:{split}", "--layer", "pool5", "--pool-size",
            2, "--no-progress", "--out", out)
        paths.append(work / out)
    return paths[0], paths[1], facts


def evaluate(work: Path, method: str, args: argparse.Namespace) -> dict:
    from ssl_cli.stages.finetune import few_labels

    train_path, test_path, facts = features_of(work, method, args)
    train_x, train_y = read_features(train_path)
    test_x, test_y = read_features(test_path)
    result = {"method": method, "dim": int(train_x.shape[1]), **facts}
    for per_class in args.labels_per_class:
        chosen = few_labels(train_y, per_class, 0)
        result[f"knn_{per_class}"] = knn_top1(train_x[chosen], train_y[chosen], test_x, test_y)
        result[f"linear_{per_class}"] = linear_top1(train_x[chosen], train_y[chosen], test_x, test_y)
    for pca in ("auto", "0"):
        result[f"nmi_pca{pca}"], result[f"acc_pca{pca}"], result[f"ari_pca{pca}"] = \
            cluster(work, test_path.name, method, pca)
    return result


def table(results: dict) -> str:
    columns = [f"{kind}_{n}" for n in LABELS_PER_CLASS for kind in ("knn", "linear")] + \
        ["nmi_pcaauto", "acc_pcaauto", "ari_pcaauto", "nmi_pca0", "acc_pca0", "ari_pca0", "train_seconds"]
    lines = ["| features | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, row in results.items():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) and c != "train_seconds" else str(row.get(c, "-"))
                 for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/fmnist-contrastive"))
    parser.add_argument("--results", type=Path, default=HERE / "contrastive.results.json")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train", type=int, default=20_000, help="training images for pre-training")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.labels_per_class = LABELS_PER_CLASS
    if args.quick:
        args.train, args.epochs, args.work = 2_000, 1, args.work.with_name(args.work.name + "-quick")
        args.results = args.work / "results.json"
    args.work.mkdir(parents=True, exist_ok=True)
    ssl(args.work, "pack", "--data", f"fashion-mnist:{FMNIST}:train", "--limit", args.train, "--no-progress",
        "--out", "train.h5")
    ssl(args.work, "pack", "--data", f"fashion-mnist:{FMNIST}:test", "--limit", 2_000, "--no-progress",
        "--out", "monitor.h5")
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    for method in args.methods.split(","):
        if method not in METHODS:
            sys.exit(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        key = method if method in ("pixels", "untrained") else f"{method} ({args.epochs} epochs of {args.train})"
        print(f"{key}:", flush=True)
        row = evaluate(args.work, method, args)
        # re-read before writing: another run of this script may have added rows meanwhile
        results = json.loads(args.results.read_text()) if args.results.exists() else {}
        results[key] = row
        args.results.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
