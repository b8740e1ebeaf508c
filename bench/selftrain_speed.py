"""Student images/s of `ssl self-train` against `ssl train` at the same arch, batch and image size.

Both commands run in subprocesses on the same packed toy images (`ssl toy-data` + `ssl pack`), taking
turns (train, self-train, train, self-train, ...) so that load from other processes falls on both;
each run's rate is the median of its epochs after the first (the first carries start-up), and the
ratio reported is the median over repeats of self-train / train from the same turn.

    student row   `ssl self-train --rounds 0`: the labelled-only student, noised (RandAugment
                  --randaugment-ops x --randaugment-magnitude, dropout), the same images per step
                  as `ssl train --batch-size B`
    round-1 row   `ssl self-train --teacher T --rounds 1 --unlabelled-ratio r`: each step takes B
                  labelled + B x r pseudo-labelled images, counted as images (the loop's own
                  images/s counts groups of 1 + r); compared with `ssl train --batch-size B(1+r)`

Target (issue 24): student images/s >= 0.9 of `ssl train`'s.

    python bench/selftrain_speed.py                          # both archs, 3 repeats (~10 min on 2 busy cores)
    python bench/selftrain_speed.py --quick                  # one arch, 1 repeat
    python bench/selftrain_speed.py --accuracy               # plus top-1 of a short self-train round on toy data
    git archive 541c977 ssl_cli | tar -x -C /tmp/before      # the PIL RandAugment in workers (issue 24's "before")
    python bench/selftrain_speed.py --before /tmp/before --accuracy   # its students in the same turns
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ARCHS = {"alexnet_bn_lowres": ["--width", "0.25"], "convnet_bn_lowres": []}


THREADS = {"OMP_NUM_THREADS": "1"}


def ssl(*args: str, tree: Path | None = None) -> None:
    """Run `python -m ssl_cli ARGS`, from the package in `tree` when given (another checkout's code)."""
    result = subprocess.run([sys.executable, "-m", "ssl_cli", *args], capture_output=True, text=True,
                            env={**os.environ, **THREADS}, cwd=tree)
    if result.returncode:
        raise SystemExit(f"ssl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def rate(checkpoint: Path, images_per_item: int = 1) -> float:
    """Median images/s of the epochs after the first, from the checkpoint's own history."""
    history = torch.load(checkpoint, weights_only=True)["meta"]["history"]
    rates = [row["images_per_second"] for row in history[1:]] or [history[0]["images_per_second"]]
    return statistics.median(rates) * images_per_item


def common(args: argparse.Namespace, arch: str) -> list[str]:
    return ["--arch", arch, *ARCHS[arch], "--image-size", str(args.size), "--epochs", str(args.epochs),
            "--workers", str(args.workers), "--device", args.device, "--no-progress", "--seed", "0"]


def train_rate(args, data: Path, eval_data: Path, arch: str, batch: int, out: Path) -> float:
    ssl("train", "--data", str(data), "--eval-data", str(eval_data), *common(args, arch), "--batch-size", str(batch),
        "--out", str(out), "--force")
    return rate(out)


def student_rate(args, data: Path, eval_data: Path, arch: str, out: Path, teacher: Path | None = None,
                 tree: Path | None = None) -> float:
    noise = ["--randaugment-ops", str(args.ops), "--randaugment-magnitude", str(args.magnitude)]
    rounds = ["--teacher", str(teacher), "--rounds", "1", "--unlabelled-ratio", str(args.ratio), "--threshold", "0"] \
        if teacher else ["--rounds", "0"]
    ssl("self-train", "--labelled", str(data), "--unlabelled", str(data), "--eval-data", str(eval_data),
        *common(args, arch), *noise, *rounds, "--batch-size", str(args.batch), "--out", str(out), "--force", tree=tree)
    folder = "round-1" if teacher else "round-0"
    return rate(out / folder / "student.pt", 1 + args.ratio if teacher else 1)


def speed(args, root: Path, data: Path, eval_data: Path) -> list[dict]:
    rows = []
    for arch in args.archs:
        turns = {"student": [], "round-1": [], "before": [], "before-1": []}
        teacher = None
        for repeat in range(args.repeats):
            bare = train_rate(args, data, eval_data, arch, args.batch, root / f"train-{arch}.pt")
            student = student_rate(args, data, eval_data, arch, root / f"self-{arch}")
            turns["student"].append((student, bare))
            print(f"{arch} repeat {repeat + 1}: train {bare:.0f} img/s, self-train student {student:.0f} img/s, "
                  f"ratio {student / bare:.2f}", flush=True)
            if args.before:
                old = student_rate(args, data, eval_data, arch, root / f"old-{arch}", tree=args.before)
                turns["before"].append((old, bare))
                print(f"{arch} repeat {repeat + 1}: self-train student of {args.before} {old:.0f} img/s, "
                      f"ratio {old / bare:.2f}", flush=True)
            if args.round1:
                teacher = root / f"self-{arch}" / "round-0" / "student.pt"
                wide = train_rate(args, data, eval_data, arch, args.batch * (1 + args.ratio), root / f"train-wide-{arch}.pt")
                mixed = student_rate(args, data, eval_data, arch, root / f"self1-{arch}", teacher)
                turns["round-1"].append((mixed, wide))
                print(f"{arch} repeat {repeat + 1}: train at batch {args.batch * (1 + args.ratio)} {wide:.0f} img/s, "
                      f"round-1 student {mixed:.0f} img/s, ratio {mixed / wide:.2f}", flush=True)
                if args.before:
                    old = student_rate(args, data, eval_data, arch, root / f"old1-{arch}", teacher, tree=args.before)
                    turns["before-1"].append((old, wide))
                    print(f"{arch} repeat {repeat + 1}: round-1 student of {args.before} {old:.0f} img/s, "
                          f"ratio {old / wide:.2f}", flush=True)
        for name, pairs in turns.items():
            if pairs:
                rows.append({"arch": arch, "row": name, "train_images_per_second": statistics.median(b for _, b in pairs),
                             "selftrain_images_per_second": statistics.median(s for s, _ in pairs),
                             "ratio": statistics.median(s / b for s, b in pairs), "repeats": len(pairs)})
    return rows


def accuracy(args, root: Path) -> dict:
    """Top-1 of round 0 (labelled only) and round 1 of a short self-train run on toy data, per seed,
    for this code and (with --before) the code in that checkout, taking turns. The settings are the
    default stages.yaml's self-train (2 labels per class of 6, where the round has something to add)."""
    labelled, evaluation = root / "acc-train", root / "acc-eval"
    ssl("toy-data", str(labelled), "--n", "480", "--classes", "6", "--size", "32", "--seed", "0")
    ssl("toy-data", str(evaluation), "--n", "240", "--classes", "6", "--size", "32", "--seed", "1")
    trees = {"after": None, **({"before": args.before} if args.before else {})}
    result: dict = {name: {} for name in trees}
    for seed in args.seeds:
        for name, tree in trees.items():
            out = root / f"acc-{name}-{seed}"
            ssl("self-train", "--labelled", str(labelled), "--unlabelled", str(labelled), "--eval-data", str(evaluation),
                "--rounds", "1", "--arch", "alexnet_bn_lowres", "--width", "0.25", "--image-size", "32",
                "--labels-per-class", "2", "--epochs", "15", "--batch-size", "8", "--threshold", "0", "--balance", "30",
                "--randaugment-ops", str(args.ops), "--randaugment-magnitude", str(args.magnitude), "--seed", str(seed),
                "--workers", "0", "--device", args.device, "--no-progress", "--out", str(out), "--force", tree=tree)
            result[name][seed] = [row["top1"] for row in json.loads((out / "summary.json").read_text())["rounds"]]
            print(f"accuracy {name} seed {seed}: top-1 per round {result[name][seed]}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048, help="toy training images (also the unlabelled set)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ops", type=int, default=2)
    parser.add_argument("--magnitude", type=int, default=5)
    parser.add_argument("--ratio", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every ssl process (1: on a shared 2-core box 2 threads ran slower)")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, from " + ", ".join(ARCHS))
    parser.add_argument("--no-round1", dest="round1", action="store_false", help="skip the round-1 rows")
    parser.add_argument("--accuracy", action="store_true", help="also a short self-train round's top-1 on toy data")
    parser.add_argument("--before", type=Path, help="a checkout of the code before (e.g. `git archive OLD ssl_cli | "
                        "tar -x -C DIR`): its self-train runs in the same turns, rows 'before' and 'before-1'")
    parser.add_argument("--seeds", default="0,1,2,3", help="seeds of the accuracy runs")
    parser.add_argument("--accuracy-only", action="store_true", help="only the accuracy run")
    parser.add_argument("--quick", action="store_true", help="one arch, one repeat, 1024 images, no round-1 rows")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.archs = args.archs.split(",")
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    THREADS["OMP_NUM_THREADS"] = str(args.threads)
    if args.quick:
        args.archs, args.repeats, args.images, args.round1 = args.archs[:1], 1, 1024, False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, data, eval_data = root / "toy", root / "toy.h5", root / "eval.h5"
        ssl("toy-data", str(folder), "--n", str(args.images), "--classes", "4", "--size", str(args.size))
        ssl("pack", "--data", str(folder), "--out", str(data), "--no-progress")
        ssl("pack", "--data", str(folder), "--out", str(eval_data), "--limit", "64", "--no-progress")
        result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "load_average": os.getloadavg(),
                  "rows": [] if args.accuracy_only else speed(args, root, data, eval_data)}
        if args.accuracy or args.accuracy_only:
            result["accuracy"] = accuracy(args, root)
    print(f"\n{'arch':<20} {'row':<9} {'train img/s':>12} {'self-train img/s':>17} {'ratio':>6}")
    for row in result["rows"]:
        print(f"{row['arch']:<20} {row['row']:<9} {row['train_images_per_second']:>12.0f} "
              f"{row['selftrain_images_per_second']:>17.0f} {row['ratio']:>6.2f}")
    for name, seeds in result.get("accuracy", {}).items():
        print(f"accuracy {name}: top-1 [round 0 (labelled only), round 1] per seed:", seeds)
    print(f"load average at the start: {result['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
