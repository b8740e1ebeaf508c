"""Is data ever the bottleneck of pretext training?

For a task (jigsawpp and rotation by default) prints, measured in one run on this machine:
  builder  = samples/s the DataLoader delivers with --workers processes building samples
  consumer = samples/s one training step (forward, backward, SGD step) of the same model consumes
  ratio    = builder / consumer   (target >= 1.0: the GPU/CPU never waits for data)
On CUDA the training step runs with bf16 autocast and channels_last, as in `ssl pretext`.

    python bench/pretext.py                      # jigsawpp on vgg16_lowres, rotation on resnet18_lowres
    python bench/pretext.py --quick              # smaller, ~1 minute
    python bench/pretext.py --device cuda --arch-jigsaw vgg16 --image-size 225   # GPU box, paper sizes
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ssl_cli.data.sources import open_source
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.device import autocast, resolve_device
from ssl_cli.models.registry import build_model
from ssl_cli.pretext.base import PretextNetwork
from ssl_cli.pretext.dataset import PretextDataset
from ssl_cli.pretext.registry import task_class


def builder_rate(dataset: PretextDataset, batch_size: int, workers: int, batches: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    iterator = iter(loader)
    next(iterator)  # worker start-up is a one-off cost, not throughput
    began, count = time.perf_counter(), 0
    for _ in range(batches):
        try:
            inputs, *_ = next(iterator)
        except StopIteration:
            break
        count += len(inputs)
    return count / (time.perf_counter() - began)


def consumer_rate(network: PretextNetwork, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
                  steps: int) -> float:
    network = network.to(device).train()
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = inputs.to(device), targets.to(device)

    def one_step() -> None:
        with autocast(device):
            loss = network.task.loss(network(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    one_step()  # warm-up (allocations, cudnn autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(inputs) / (time.perf_counter() - began)


def measure(task_name: str, arch: str, arch_kwargs: dict, image_size: int, task_options: dict, folder: Path,
            args: argparse.Namespace, device: torch.device) -> dict:
    task = task_class(task_name)(image_size=image_size, **task_options)
    dataset = PretextDataset(open_source(str(folder)), task, seed=0)
    builder = builder_rate(dataset, args.batch_size, args.workers, args.batches)
    batch = [dataset[i] for i in range(args.batch_size)]
    inputs = torch.stack([item[0] for item in batch])
    targets = torch.stack([item[1] for item in batch])
    torch.manual_seed(0)
    network = PretextNetwork(build_model(arch, **arch_kwargs), task)
    consumer = consumer_rate(network, inputs, targets, device, args.steps)
    return {"task": task_name, "arch": arch, "image_size": image_size, "workers": args.workers,
            "device": str(device), "builder_samples_per_s": builder, "consumer_samples_per_s": consumer,
            "ratio": builder / consumer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch-jigsaw", default="vgg16_lowres")
    parser.add_argument("--arch-rotation", default="resnet18_lowres")
    parser.add_argument("--image-size", type=int, default=114, help="jigsaw crop size: 114 gives the 32-px tiles VGG needs (225 = paper)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.batches = 6 if args.quick else 20
    args.steps = 2 if args.quick else 5
    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "toy"
        size = max(32, args.image_size)
        write_toy_folder(folder, n=args.batch_size * (args.batches + 2), classes=10, size=size, seed=0)
        small = {"width": 0.5} if args.arch_jigsaw.endswith("_lowres") and "resnet" not in args.arch_jigsaw else {}
        rows.append(measure("jigsawpp", args.arch_jigsaw, small, args.image_size, {}, folder, args, device))
        rows.append(measure("rotation", args.arch_rotation, {}, 32, {}, folder, args, device))
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{'task':<10} {'arch':<16} {'size':>4} {'workers':>7} {'builder/s':>10} {'train step/s':>12} {'ratio':>6}")
    for row in rows:
        print(f"{row['task']:<10} {row['arch']:<16} {row['image_size']:>4} {row['workers']:>7} "
              f"{row['builder_samples_per_s']:>10.1f} {row['consumer_samples_per_s']:>12.1f} {row['ratio']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
