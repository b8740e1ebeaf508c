"""Handcrafted pretext tasks: the tool's images/s against a bare step of the same network, in one run.

For every handcrafted task that cuts its sample out of the image (rotation, context, inpainting,
jigsaw, jigsawpp), on the Fashion-MNIST methods table's settings (bench/fmnist/contrastive.py:
alexnet_bn_lowres, batch 128, jigsaw from a 48 px crop in 15 px tiles, 28 px images in an .h5
store), this prints, measured interleaved and repeated in one run (medians):

  bare      = images/s of a bare PyTorch step of the same network (the task's head included) on the
              task's own inputs: random tensors of the sample's shape already in memory, the tool's
              optimizer, forward + loss + backward + step, nothing else
  tool      = images/s `ssl pretext` reports (`stages.pretext.run`, the real loop), median of its epochs
              after the first
  per-image = the same with the per-image sample path (`PretextDataset`: `build_sample` in --workers
              DataLoader processes, PIL/numpy per image), i.e. how the tasks ran before issue 24
  ratio     = tool / bare (target >= 0.8)

    python bench/pretext_speed.py                  # ~15 minutes on 2 cores
    python bench/pretext_speed.py --quick          # 1 repeat, smaller epochs
    python bench/pretext_speed.py --tasks jigsaw rotation --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ssl_cli.config import PackConfig, PretextConfig
from ssl_cli.data.sources import open_source
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.device import autocast, resolve_device
from ssl_cli.models.registry import build_model
from ssl_cli.pretext.base import PretextNetwork, PretextTask
from ssl_cli.pretext.dataset import PretextDataset
from ssl_cli.pretext.registry import task_class
from ssl_cli.stages import pack, pretext
from ssl_cli.train.loop import make_optimizer, metrics_path
from ssl_cli.train.recipe import train_options, with_arch_recipe

ARCH = "alexnet_bn_lowres"
JIGSAW = {"image_size": 48, "task_options": {"tile_size": 15}}
TASKS = {"rotation": {}, "context": {}, "inpainting": {}, "jigsaw": JIGSAW, "jigsawpp": JIGSAW}


@contextmanager
def per_image_path(task_name: str) -> Iterator[None]:
    """The task trains from `build_sample` per image in DataLoader workers (no batched sample)."""
    cls = task_class(task_name)
    saved = {name: cls.__dict__.get(name) for name in ("dataset", "batch_transform")}
    cls.dataset = lambda self, source, seed: PretextDataset(source, self, seed)
    cls.batch_transform = lambda self: None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(cls, name)
            else:
                setattr(cls, name, value)


def config(task_name: str, data: Path, out: Path, args: argparse.Namespace) -> PretextConfig:
    extra = TASKS[task_name]
    return PretextConfig(task=task_name, arch=ARCH, data=str(data), out=out, force=True, progress=False,
                         epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, device=args.device,
                         image_size=extra.get("image_size"), task_options=extra.get("task_options", {}))


def tool_rate(cfg: PretextConfig) -> float:
    """images/s of a real `ssl pretext` run: the median over its epochs after the first (warm-up)."""
    pretext.run(cfg)
    rows = [json.loads(line) for line in metrics_path(cfg.out).read_text().splitlines() if line.strip()]
    return statistics.median(row["images_per_second"] for row in rows[1:] or rows)


def loop_choices(device: torch.device):
    """(channels_last, a maker of the autocast context) as the training loop picks them for `device`, so the bare
    step runs with the same memory format and precision as the tool (older loops: both on CUDA only)."""
    from ssl_cli import device as devices

    if hasattr(devices, "training_channels_last"):
        bf16 = devices.training_bf16(device)
        return devices.training_channels_last(device), lambda: devices.training_autocast(device, bf16)
    return device.type == "cuda", lambda: autocast(device)


def bare_rate(cfg: PretextConfig, steps: int, blocks: int) -> float:
    """images/s of forward + loss + backward + step on random inputs of the task's sample shape."""
    cfg = with_arch_recipe(cfg)
    source = open_source(cfg.data)
    task: PretextTask = pretext.make_task(cfg, source)
    samples = [PretextDataset(source, task, 0)[i] for i in range(cfg.batch_size)]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((cfg.batch_size, *samples[0][0].shape), generator=generator)
    targets = torch.stack([sample[1] for sample in samples])
    device = resolve_device(cfg.device)
    channels_last, precision = loop_choices(device)
    torch.manual_seed(0)
    network = PretextNetwork(build_model(cfg.arch), task).to(device).train()
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(network, train_options(cfg, len(source)))
    inputs, targets = inputs.to(device), targets.to(device)

    def one_step() -> None:
        with precision():
            loss = task.loss(network(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        one_step()
    rates = []
    for _ in range(blocks):  # as many blocks as the tool's timed epochs, the median of them
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * cfg.batch_size / (time.perf_counter() - began))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch (and per timed block of bare steps)")
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up, the median of the rest counts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-per-image", action="store_true", help="skip the per-image (pre issue 24) path")
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.epochs = 1, 5, 3
    variants = ["bare", "tool"] + ([] if args.no_per_image else ["per-image"])
    figures: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_toy_folder(work / "toy", n=args.batch_size * args.steps, classes=10, size=28, seed=0)
        pack.run(PackConfig(data=str(work / "toy"), out=work / "images.h5", progress=False))
        for repeat in range(args.repeats):
            for task_name in args.tasks:
                # rotate the order so no variant always runs first (the machine is shared and noisy)
                shift = repeat % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    cfg = config(task_name, work / "images.h5", work / f"{task_name}.pt", args)
                    if variant == "bare":
                        rate = bare_rate(cfg, args.steps, max(1, args.epochs - 1))
                    elif variant == "tool":
                        rate = tool_rate(cfg)
                    else:
                        with per_image_path(task_name):
                            rate = tool_rate(cfg)
                    figures.setdefault((task_name, variant), []).append(rate)
                    print(f"  repeat {repeat + 1} {task_name:<10} {variant:<9} {rate:8.1f} img/s", flush=True)
    device = resolve_device(args.device)
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; {ARCH}, batch {args.batch_size}, medians of {args.repeats}")
    print(f"{'task':<10} {'bare/s':>8} {'tool/s':>8} {'ratio':>6}" + ("" if args.no_per_image else
                                                                  f" {'per-image/s':>11} {'ratio':>6}"))
    rows = []
    for task_name in args.tasks:
        median = {variant: statistics.median(figures[(task_name, variant)]) for variant in variants}
        row = {"name": f"pretext {task_name}", "tool_images_per_second": median["tool"],
               "bare_images_per_second": median["bare"], "ratio": median["tool"] / median["bare"]}
        line = f"{task_name:<10} {median['bare']:8.1f} {median['tool']:8.1f} {row['ratio']:6.2f}"
        if "per-image" in median:
            row["per_image_images_per_second"] = median["per-image"]
            row["per_image_ratio"] = median["per-image"] / median["bare"]
            line += f" {median['per-image']:11.1f} {row['per_image_ratio']:6.2f}"
        rows.append(row)
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
