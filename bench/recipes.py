"""What moves Fashion-MNIST test top-1 when an arch learns from labels alone (issue 12's ablation).

Every row is one `ssl train` (or `ssl self-train --rounds 0` for the noise rows) run in a subprocess
with the tool's defaults plus the row's flags; its test top-1 and wall time are read back from the
files it writes. Two baselines are measured in the same run:

  plain     a plain PyTorch script: the 5-conv net with batch norm (32-32-64-64-128) of the issue,
            AdamW one-cycle at 2e-3, label smoothing 0.1, flips and 2-px shifts, 28 px, in memory;
  speed     the tool's loop against a bare PyTorch loop on the same model (alexnet_bn_lowres at its
            defaults), batch and batched augmentation: images/s of both, and their ratio.

Results go to bench/recipes.results.json (committed, with the 1-minute load average when each row
started: these figures were taken on a shared 2-core machine) after every row, so an interrupted
run continues where it stopped (an interrupted `ssl train` resumes from its own .partial under
--work); re-running prints the table again.

    python bench/recipes.py                       # the 100-labels-per-class ablation (~30 min on 2 idle cores)
    python bench/recipes.py --all-labels          # plus the all-labels rows (~10 min each)
    python bench/recipes.py --rows defaults,plain --quick   # mechanics only (tiny epochs)
    python bench/recipes.py --rows defaults,plain --seeds 1,2  # the same rows with more seeds

With 1,000 labelled images the subset and the initialisation move top-1 by about a point, so the
rows that decide a default are run with several seeds (`--seeds`: the labelled subset, the
initialisation and the augmentation all follow the seed); the table shows their mean and each seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FMNIST = "/usr/share/datasets/fashion-mnist"
TRAIN = f"fashion-mnist:{FMNIST}:train"
ARCH = "alexnet_bn_lowres"


@dataclass(frozen=True)
class Row:
    name: str
    flags: str  # added to the defaults
    labels_per_class: int | None = 100  # None: all labels
    command: str = "train"  # or "self-train" (round 0 only: the noised teacher)


ROWS = [  # in the order they run: the rows that decide a default first
    Row("defaults", ""),
    Row("convnet_bn_lowres (the plain script's net as an arch)", "--arch convnet_bn_lowres"),
    Row("dropout 0.5", "--dropout 0.5"),
    Row("100 epochs", "--epochs 100"),
    Row("image 32 px (upsampled)", "--image-size 32"),
    Row("noise: RandAugment 2x9 + dropout 0.5 + crop 0.2 (Noisy Student)",
        "--randaugment-ops 2 --randaugment-magnitude 9 --dropout 0.5 --min-scale 0.2", command="self-train"),
    Row("noise: RandAugment 2x5 + dropout 0.5", "--randaugment-ops 2 --randaugment-magnitude 5 --dropout 0.5",
        command="self-train"),
    Row("noise: none (self-train round 0)", "--randaugment-ops 0 --dropout 0", command="self-train"),
    Row("no label smoothing", "--label-smoothing 0"),
    Row("warm-up 2 + cosine", "--schedule cosine --warmup-epochs 2"),
    Row("SGD 0.05 + cosine", "--optimizer sgd --lr 0.05 --weight-decay 5e-4 --schedule cosine --warmup-epochs 2"),
    Row("no shift", "--shift 0"),
    Row("crop min-scale 0.2", "--min-scale 0.2"),
    Row("crop min-scale 0.6", "--min-scale 0.6"),
    Row("no batch norm (alexnet_lowres w0.25)", "--arch alexnet_lowres --width 0.25"),
    Row("vgg16_bn_lowres w0.25", "--arch vgg16_bn_lowres --width 0.25"),
    Row("width 0.5", "--width 0.5"),
    Row("width 1.0", "--width 1.0"),
    Row("30 epochs", "--epochs 30"),
    # issue 24: the batch size, AdamW's learning rate scaled by the square-root rule (lr x sqrt(B / 64); Malladi
    # et al. 2022 derive it for adaptive optimizers; the linear rule is SGD's); the epochs stay (same images seen)
    Row("batch 128 (lr 0.00283 by the sqrt rule)", "--batch-size 128 --lr 0.00283"),
    Row("batch 256 (lr 0.004 by the sqrt rule)", "--batch-size 256 --lr 0.004"),
    Row("convnet_bn_lowres batch 256 (lr 0.004 by the sqrt rule)", "--arch convnet_bn_lowres --batch-size 256 --lr 0.004"),
]
ALL_LABEL_ROWS = [
    Row("all labels: defaults", "", None),
    Row("all labels: width 0.5", "--width 0.5", None),
]


def ssl(*args: str) -> list[str]:
    return [sys.executable, "-m", "ssl_cli", *args]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_row(row: Row, work: Path, quick: bool, seed: int = 0) -> dict:
    out = work / (slug(row.name) + (f"-s{seed}" if seed else ""))
    flags = shlex.split(row.flags) + (["--epochs", "1"] if quick and "--epochs" not in row.flags else []) \
        + (["--seed", str(seed)] if seed else [])
    few = ["--labels-per-class", str(row.labels_per_class)] if row.labels_per_class else []
    if row.command == "train":
        command = ssl("train", "--data", TRAIN, "--arch", ARCH, *few, "--out", str(out / "model.pt"), "--no-progress",
                      *flags)
    else:
        arch = [] if "--arch" in flags else ["--arch", ARCH]
        command = ssl("self-train", "--labelled", TRAIN, "--unlabelled", TRAIN, *few, "--rounds", "0", *arch,
                      "--out", str(out / "self-train"), "--no-progress", *flags)
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"row {row.name!r} failed ({done.returncode}):\n{shlex.join(command)}\n{done.stderr[-2000:]}")
    if row.command == "train":
        report = json.loads((out / "model.eval.json").read_text())
        history = [json.loads(line) for line in (out / "model.metrics.jsonl").read_text().splitlines()]
    else:
        report = json.loads((out / "self-train" / "round-0" / "metrics.json").read_text())["student"]
        history = [json.loads(line) for line in
                   (out / "self-train" / "round-0" / "student.metrics.jsonl").read_text().splitlines()]
    return {"top1": report["top1"], "epochs": len(history), "train_seconds": sum(h["seconds"] for h in history),
            "wall_seconds": seconds, "command": shlex.join(command[2:])}


# --- the plain PyTorch baseline ----------------------------------------------------------------


def fmnist_arrays(split: str):
    import numpy as np

    from ssl_cli.data.fashion_mnist import read_idx

    prefix = "train" if split == "train" else "t10k"
    images = read_idx(Path(FMNIST) / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(Path(FMNIST) / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def plain_net():
    from torch import nn

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    # pooled after the 1st, 2nd and 4th conv (28 -> 14 -> 7 -> 3): about 5M multiply-adds per image
    return nn.Sequential(*block(1, 32), nn.MaxPool2d(2), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                         *block(64, 64), nn.MaxPool2d(2), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10))


def run_plain(per_class: int | None, epochs: int, seed: int = 0) -> dict:
    """The issue's plain script: 28 px grey, flips and 2-px shifts (pad + crop), AdamW one-cycle, smoothing 0.1."""
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(seed)
    np.random.seed(seed)
    images, labels = fmnist_arrays("train")
    if per_class:
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]))
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images).float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
    y = torch.from_numpy(labels)
    test_images, test_labels = fmnist_arrays("test")
    tx = torch.from_numpy(test_images).float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
    model = plain_net()
    batch = 64
    steps = epochs * (len(x) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    began = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            index = order[start:start + batch]
            xb = nn.functional.pad(x[index], (2, 2, 2, 2))
            dx, dy = np.random.randint(0, 5, 2)
            xb = xb[:, :, dy:dy + 28, dx:dx + 28]
            flip = torch.rand(len(xb)) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), y[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - began
    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(tx[i:i + 1000]).argmax(1) for i in range(0, len(tx), 1000)])
    return {"top1": float((predictions.numpy() == test_labels).mean()), "epochs": epochs, "train_seconds": seconds,
            "wall_seconds": seconds, "command": f"plain PyTorch, {per_class or 'all'} labels per class"}


# --- loop speed: the tool's loop against a bare loop on the same model and augmentation ---------


def run_speed(steps: int, batch: int) -> dict:
    """images/s of ssl_cli.train.loop.train and of a bare loop, same model/batch/augmentation, interleaved."""
    import tempfile

    import numpy as np
    import torch

    from ssl_cli.artifacts.schema import make_provenance
    from ssl_cli.data.sources import open_source
    from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ssl_cli.data.resized import ResizedImages
    from ssl_cli.data.batch_augment import BatchAugment, step_generator
    from ssl_cli.models.registry import build_model
    from ssl_cli.train.loop import TrainOptions, train
    from ssl_cli.train.recipe import classification_step, default_shift

    source = open_source(TRAIN)
    indices = np.arange(steps * batch)
    dataset = ResizedImages(source, indices, source.targets[indices].astype(np.int64), 32)
    augment = BatchAugment(IMAGENET_MEAN, IMAGENET_STD, shift=default_shift(32), flip=True)
    step = classification_step(0.1)

    def tool() -> float:
        torch.manual_seed(0)
        model = build_model(ARCH, num_classes=10)
        options = TrainOptions(epochs=1, batch_size=batch, lr=2e-3, optimizer="adamw", weight_decay=0.05,
                               schedule="onecycle", workers=0, progress=False)
        with tempfile.TemporaryDirectory() as folder:
            provenance = make_provenance("checkpoint", "bench", {}, {"t": time.time()}, [])
            result = train(model, dataset, step, options, Path(folder) / "m.pt", provenance,
                           lambda m: {"model": m.state_dict()}, batch_transform=augment)
        return result.history[-1]["images_per_second"]

    def bare() -> float:
        torch.manual_seed(0)
        model = build_model(ARCH, num_classes=10)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        images, labels = dataset.cache, torch.from_numpy(dataset.labels)
        model.train()
        began = time.perf_counter()
        order = torch.randperm(len(images))
        for s in range(steps):
            index = order[s * batch:(s + 1) * batch]
            x = augment(images[index], step_generator(0, 0, s, torch.device("cpu")))
            loss, _ = step(model, x, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps * batch / (time.perf_counter() - began)

    tool_rates, bare_rates = [], []
    for _ in range(2):  # interleaved, so drift on a busy machine hits both
        bare_rates.append(bare())
        tool_rates.append(tool())
    tool_rate, bare_rate = max(tool_rates), max(bare_rates)
    return {"tool_images_per_second": tool_rate, "bare_images_per_second": bare_rate, "ratio": tool_rate / bare_rate,
            "steps": steps, "batch": batch}


SEED_MARK = " [seed "


def table(results: dict) -> str:
    """One line per row; a row run with several seeds shows their mean and each seed's top-1."""
    lines = ["| row | labels | top-1 | seeds | epochs | train time | wall time |", "|---|---|---|---|---|---|---|"]
    for name, value in results.items():
        if name.startswith("speed") or SEED_MARK in name:
            continue
        runs = [value] + [results[key] for key in results if key.startswith(name + SEED_MARK)]
        top1 = [run["top1"] for run in runs]
        seeds = " / ".join(f"{t:.4f}" for t in top1) if len(runs) > 1 else "0"
        labels = "all" if "all labels" in name else "100/class"
        lines.append(f"| {name} | {labels} | {sum(top1) / len(top1):.4f} | {seeds} | {value['epochs']} | "
                     f"{value['train_seconds'] / 60:.1f} min | {value['wall_seconds'] / 60:.1f} min |")
    if "speed" in results:
        speed = results["speed"]
        lines.append("")
        lines.append(f"loop speed ({ARCH}, batch {speed['batch']}, {speed['steps']} steps, batched augmentation): "
                     f"tool {speed['tool_images_per_second']:.0f} img/s, bare loop {speed['bare_images_per_second']:.0f}"
                     f" img/s, ratio {speed['ratio']:.2f} (target >= 0.9)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-recipes"), help="run folders")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("recipes.results.json"),
                        help="the rows measured so far (rows already there are not run again)")
    parser.add_argument("--rows", help="comma-separated row names (or slugs) to run; default: all")
    parser.add_argument("--all-labels", action="store_true", help="also the all-labels rows")
    parser.add_argument("--quick", action="store_true", help="1 epoch per row: checks the mechanics")
    parser.add_argument("--speed-steps", type=int, default=150)
    parser.add_argument("--seeds", default="", help="comma-separated extra seeds for the chosen --rows (seed 0 is the row itself)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.results
    results = json.loads(store.read_text()) if store.exists() else {}
    rows = ROWS + (ALL_LABEL_ROWS if args.all_labels else [])
    wanted = set(args.rows.split(",")) if args.rows else None
    # the rows every conclusion needs come first, so a stopped run has them
    first = [row for row in rows if row.name == "defaults"]
    plan: list[tuple[str, object]] = [("plain 100/class", lambda: run_plain(100, 1 if args.quick else 60))]
    plan += [(row.name, lambda row=row: run_row(row, args.work, args.quick)) for row in first]
    plan.append(("speed", lambda: run_speed(20 if args.quick else args.speed_steps, 64)))
    plan += [(row.name, lambda row=row: run_row(row, args.work, args.quick)) for row in rows
             if row not in first and row.labels_per_class]
    if args.all_labels:
        plan.append(("plain all labels", lambda: run_plain(None, 1 if args.quick else 12)))
        plan += [(row.name, lambda row=row: run_row(row, args.work, args.quick)) for row in rows
                 if not row.labels_per_class]
    base_names = [name for name, _ in plan if name not in ("speed", "plain all labels")]
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        plan = plan + [(f"{name}{SEED_MARK}{seed}]", lambda name=name, seed=seed: (
            run_plain(100, 1 if args.quick else 60, seed) if name == "plain 100/class" else
            run_row(next(row for row in rows if row.name == name), args.work, args.quick, seed)))
            for name in base_names]
    for name, job in plan:
        base = name.split(SEED_MARK)[0]
        if wanted and base not in wanted and slug(base) not in wanted and base.split()[0] not in wanted:
            continue
        if name in results:
            continue
        print(f"running {name} ...", flush=True)
        load = os.getloadavg()[0]
        results[name] = {**job(), "load_average_at_start": round(load, 2), "cpus": os.cpu_count()}
        store.write_text(json.dumps(results, indent=1))
        if name == "speed":
            print(f"  loop/bare images/s: {results[name]['ratio']:.2f}", flush=True)
        else:
            print(f"  top-1 {results[name]['top1']:.4f} in {results[name]['wall_seconds'] / 60:.1f} min", flush=True)
    print(table(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
