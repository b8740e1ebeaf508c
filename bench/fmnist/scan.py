"""SCAN on Fashion-MNIST against k-means on the pixels and on the same features (issue 14).

SCAN's protocol: the clusters are learned on training images and scored on the test split (10,000
images, k = 10 against the 10 classes): NMI, Hungarian accuracy and ARI. Every row here follows it:

  pixels k-means      `ssl cluster --k 10` on the raw pixels (784-d in [0, 1]) of the training images,
                      then `ssl pseudolabel` of the test pixels with those centroids
  features k-means    the same on the pretext checkpoint's pooled trunk features (`ssl extract`)
  SCAN (frozen)       `ssl cluster --method scan --scan-backbone frozen --model CKPT --data TRAIN --assign-data
                      TEST`: heads on the frozen network's features, with and without self-labelling
                      (--no-self-label); rows scan, scan-noself
  SCAN (as published) the same with `--scan-backbone train`: the SCAN step and self-labelling train the
                      network with the heads (Adam(W) 1e-4 for both, weight decay 1e-4, as in the paper:
                      --train-lr, --backbone-lr); rows scan-train, scan-train-noself. The neighbours are
                      the frozen rows' file (mined once from the checkpoint's features)

The published figures the issue compares with cluster all 70,000 images together (train and test);
they are printed beside the table with that protocol, not mixed into it.

Results go to bench/fmnist/scan.results.json after every row (finished `ssl` stages are skipped, so a
stopped run continues), and a table to stdout.

    python bench/fmnist/scan.py                                    # simclr of bench/fmnist/contrastive.py
    python bench/fmnist/scan.py --model runs/x/moco2.pt --name moco2 --train 60000
    python bench/fmnist/scan.py --only pixels                      # one row
    python bench/fmnist/scan.py --only scan-train-noself,scan-train  # SCAN as published, network trained
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from contrastive import ssl, write_pixels  # noqa: E402  (the same runner and pixel files as the contrastive bench)
FMNIST = "/usr/share/datasets/fashion-mnist"
PUBLISHED = [  # (method, NMI, ACC, ARI or None, protocol)
    ("k-means on pixels", 0.51, 0.47, None, "all 70k images"),
    ("autoencoder + k-means", 0.637, 0.606, None, "all 70k images"),
    ("DEC", 0.651, 0.618, 0.494, "all 70k images"),
    ("N2D", 0.684, 0.672, None, "all 70k images"),
]


def metrics_of(path: Path) -> dict:
    with h5py.File(path) as handle:
        quality = json.loads(handle.attrs["metrics"])
    return {"nmi": quality["nmi"], "acc": quality["acc_hungarian"], "ari": quality["ari"]}


def pixels(work: Path, split: str) -> str:
    """The raw pixels of a split as a features file (the contrastive bench's writer)."""
    return write_pixels(work, split).name


def kmeans_row(work: Path, name: str, train_features: str, test_features: str, pca: str) -> dict:
    seconds = ssl(work, "cluster", "--features", train_features, "--k", 10, "--pca-dim", pca, "--niter", 50, "--seed", 0,
                  "--no-progress", "--out", f"{name}-kmeans-pca{pca}.h5")
    seconds += ssl(work, "pseudolabel", "--clusters", f"{name}-kmeans-pca{pca}.h5", "--features", test_features,
                   "--no-progress", "--out", f"{name}-kmeans-pca{pca}-test.h5")
    return {**metrics_of(work / f"{name}-kmeans-pca{pca}-test.h5"), "seconds": round(seconds, 1)}


def scan_row(work: Path, args: argparse.Namespace, self_label: bool, backbone: str = "frozen") -> dict:
    variant = "-train" if backbone == "train" else ""  # the frozen rows keep the names they had before the option
    out = f"{args.name}-scan{variant}-sl{args.self_label_lr:g}.h5" if self_label else f"{args.name}-scan{variant}-noself.h5"
    lr = ["--lr", args.train_lr, "--backbone-lr", args.backbone_lr] if backbone == "train" else ["--lr", args.lr]
    flags = ["--self-label" if self_label else "--no-self-label", "--scan-epochs", args.scan_epochs,
             "--self-label-epochs", args.self_label_epochs, *lr, "--self-label-lr", args.self_label_lr,
             "--batch-size", args.batch_size, "--scan-backbone", backbone]
    seconds = ssl(work, "cluster", "--method", "scan", "--model", args.model.resolve(), "--data", "train.h5",
                  "--assign-data", f"fashion-mnist:{FMNIST}:test", "--k", 10, "--neighbours",
                  f"{args.name}.neighbours.h5", *flags, *(["--force"] if args.force else []), "--no-progress",
                  "--out", out)
    with h5py.File(work / out) as handle:
        extra = {"neighbour_agreement": float(handle.attrs.get("neighbour_agreement", float("nan"))),
                 "head": int(handle.attrs["head"])}
        if "self_labelled" in handle.attrs:
            extra["self_labelled"] = int(handle.attrs["self_labelled"])
    return {**metrics_of(work / out), **extra, "seconds": round(seconds, 1)}


def table(results: dict) -> str:
    lines = ["| clusters (train -> test split) | NMI | ACC | ARI | wall s |", "|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['nmi']:.3f} | {row['acc']:.3f} | {row['ari']:.3f} | {row['seconds']} |")
    lines += ["", "| published (other protocol) | NMI | ACC | ARI | protocol |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {n} | {a} | {r if r is not None else '-'} | {p} |" for m, n, a, r, p in PUBLISHED]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/fmnist-scan"))
    parser.add_argument("--results", type=Path, default=HERE / "scan.results.json")
    parser.add_argument("--model", type=Path, default=Path("runs/fmnist-contrastive/simclr.pt"))
    parser.add_argument("--name", default="simclr", help="the checkpoint's name in the table")
    parser.add_argument("--train", type=int, default=20_000, help="training images the clusters are learned on")
    parser.add_argument("--scan-epochs", type=int, default=30)
    parser.add_argument("--self-label-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01, help="the heads' learning rate, frozen rows")
    parser.add_argument("--train-lr", type=float, default=1e-4, help="the heads' learning rate, scan-train rows")
    parser.add_argument("--backbone-lr", type=float, default=1e-4, help="the network's learning rate, scan-train rows")
    parser.add_argument("--self-label-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--only", default="pixels,features,scan-noself,scan,scan-train-noself,scan-train",
                        help="rows to run: pixels, features, scan-noself, scan, scan-train-noself, scan-train")
    parser.add_argument("--force", action="store_true",
                        help="replace SCAN outputs made with other settings (or by an older version of the stage)")
    args = parser.parse_args()
    if not args.model.exists():
        sys.exit(f"--model {args.model} does not exist; run bench/fmnist/contrastive.py first (or pass another)")
    args.work.mkdir(parents=True, exist_ok=True)
    ssl(args.work, "pack", "--data", f"fashion-mnist:{FMNIST}:train", "--limit", args.train, "--no-progress",
        "--out", "train.h5")
    results: dict = {}
    for row in args.only.split(","):
        print(f"{row}:", flush=True)
        if row == "pixels":
            train, test = pixels(args.work, "train"), pixels(args.work, "test")
            for pca in ("auto", "0"):
                results[f"pixels k-means (PCA {pca}; 60k train)"] = kmeans_row(args.work, "pixels", train, test, pca)
        elif row == "features":
            for split, data in (("train", "train.h5"), ("test", f"fashion-mnist:{FMNIST}:test")):
                ssl(args.work, "extract", "--model", args.model.resolve(), "--data", data, "--layer", "pool5",
                    "--no-progress", "--out", f"{args.name}-{split}.h5")
            results[f"{args.name} features k-means ({args.train} train)"] = kmeans_row(
                args.work, args.name, f"{args.name}-train.h5", f"{args.name}-test.h5", "auto")
        elif row in ("scan", "scan-noself"):
            label = f"SCAN + self-label (lr {args.self_label_lr:g})" if row == "scan" else "SCAN, no self-label"
            results[f"{label} from {args.name} ({args.train} train)"] = scan_row(args.work, args, row == "scan")
        elif row in ("scan-train", "scan-train-noself"):
            label = (f"SCAN as published + self-label (lr {args.self_label_lr:g})" if row == "scan-train"
                     else "SCAN as published, no self-label")
            results[f"{label} from {args.name} ({args.train} train)"] = scan_row(args.work, args, row == "scan-train",
                                                                                 "train")
        else:
            sys.exit(f"unknown row {row!r}; use pixels, features, scan-noself, scan, scan-train-noself, scan-train")
        # merged into the file as it is now: another run of this script may have added rows meanwhile
        results = {**(json.loads(args.results.read_text()) if args.results.exists() else {}), **results}
        args.results.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
