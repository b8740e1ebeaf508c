"""bench/fmnist's supervised and self-training rows as a new user types them: no tuning flags (issue 12).

Rows, each one `ssl` command with the data, the arch and nothing else (the small-image defaults of
ssl_cli/train/recipe.py decide epochs, optimizer, schedule, noise and image size):

  labels alone   ssl train --labels-per-class 100 (and 500)            (the supervised baselines)
  teacher        ssl self-train --labels-per-class 100 --rounds 0      (the same, as self-train's round 0)
  rounds         ssl self-train --teacher <teacher> --rounds 2         (2 noised students, 20k unlabelled images)
  all labels     ssl train                                             (60,000 labels)

Results (test top-1 and the training seconds the metrics files record) go to
bench/fmnist/defaults.results.json after every row; a re-run skips finished stages (their outputs are
up to date) and prints the table again.

    python bench/fmnist/defaults.py                      # ~25 min on 2 idle cores
    python bench/fmnist/defaults.py --arch vgg16_bn_lowres
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FMNIST = "/usr/share/datasets/fashion-mnist"
TRAIN = f"fashion-mnist:{FMNIST}:train"


def ssl(work: Path, *args: object) -> float:
    argv = [str(a) for a in args]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ssl_cli", *argv, "--no-progress"], cwd=work, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"failed: ssl {shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - began
    print(f"  {seconds:7.1f}s  ssl {shlex.join(argv)[:140]}", flush=True)
    return seconds


def train_seconds(metrics: Path) -> float:
    return round(sum(json.loads(line)["seconds"] for line in metrics.read_text().splitlines()), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/fmnist-defaults"))
    parser.add_argument("--results", type=Path, default=HERE / "defaults.results.json")
    parser.add_argument("--arch", default="alexnet_bn_lowres")
    parser.add_argument("--unlabelled", type=int, default=20_000, help="unlabelled images for self-training")
    parser.add_argument("--skip", default="", help="comma-separated rows not to run now: few, few500, teacher, rounds, all")
    args = parser.parse_args()
    work = args.work / args.arch
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    rows = results.setdefault(args.arch, {})
    arch = ["--arch", args.arch]
    few = ["--labels-per-class", 100]

    def record(name: str, command: str, top1: float, seconds: float) -> None:
        rows[name] = {"top1": top1, "train_seconds": seconds, "command": command}
        args.results.write_text(json.dumps(results, indent=1))

    skip = set(args.skip.split(","))
    ssl(work, "pack", "--data", TRAIN, "--limit", args.unlabelled, "--out", "unlabelled.h5")
    for row, per_class in (("few", 100), ("few500", 500)):
        if row in skip:
            continue
        ssl(work, "train", "--data", TRAIN, *arch, "--labels-per-class", per_class, "--out", f"{row}/model.pt")
        record(f"labels alone (ssl train, {per_class} per class)",
               f"ssl train --data {TRAIN} --arch {args.arch} --labels-per-class {per_class}",
               json.loads((work / f"{row}/model.eval.json").read_text())["top1"],
               train_seconds(work / f"{row}/model.metrics.jsonl"))
    self_train = ["self-train", "--labelled", TRAIN, *few, "--unlabelled", "unlabelled.h5", *arch]
    if "teacher" not in skip:
        ssl(work, *self_train, "--rounds", 0, "--out", "teacher")
        summary = json.loads((work / "teacher/summary.json").read_text())
        record("self-train round 0 (the teacher)", "ssl " + shlex.join(map(str, [*self_train, "--rounds", 0])),
               summary["rounds"][0]["top1"], train_seconds(work / "teacher/round-0/student.metrics.jsonl"))
    if "rounds" not in skip:
        rounds = [*self_train, "--teacher", "teacher/round-0/student.pt", "--rounds", 2]
        ssl(work, *rounds, "--out", "rounds")
        summary = json.loads((work / "rounds/summary.json").read_text())
        for item in summary["rounds"][1:]:
            r = item["round"]
            record(f"self-train round {r} student ({item['pseudo_labelled']} pseudo-labels, "
                   f"{item['pseudo_accuracy']:.3f} right)", "ssl " + shlex.join(map(str, rounds)),
                   item["top1"], train_seconds(work / f"rounds/round-{r}/student.metrics.jsonl"))
    if "all" not in skip:
        ssl(work, "train", "--data", TRAIN, *arch, "--out", "all/model.pt")
        record("all 60,000 labels (ssl train)", f"ssl train --data {TRAIN} --arch {args.arch}",
               json.loads((work / "all/model.eval.json").read_text())["top1"],
               train_seconds(work / "all/model.metrics.jsonl"))
    print(f"| {args.arch} | top-1 | training seconds |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['top1']:.4f} | {row['train_seconds']} |")


if __name__ == "__main__":
    main()
