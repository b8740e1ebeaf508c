"""Is data ever the bottleneck of pretext training?

For a task (jigsawpp and rotation by default, then simclr on alexnet_lowres and resnet18_lowres at
32 px) prints, measured in one run on this machine:
  builder  = samples/s the data path delivers: for the handcrafted tasks the DataLoader with
             --workers processes building samples; for simclr the loader (in memory, as the loop
             runs it) plus the two views made in batches on the device (ssl_cli.data.views)
  consumer = samples/s one training step (forward, backward, SGD step) of the same model consumes
  ratio    = builder / consumer   (target >= 1.0: the GPU/CPU never waits for data)
On CUDA the training step runs with bf16 autocast and channels_last, as in `ssl pretext`. On a CPU
the simclr views are made by the same cores between steps, so a ratio r costs 1 / (1 + r) of the
time: at r >= 1 views take at most half of it (and a GPU makes them asynchronously).

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


def measure_views(task_name: str, arch: str, arch_kwargs: dict, image_size: int, folder: Path,
                  args: argparse.Namespace, device: torch.device) -> dict:
    """A contrastive task: loader + batched views against the training step (objective included)."""
    from ssl_cli.data.batch_augment import step_generator
    from ssl_cli.train.distributed import ProcessGroup
    from ssl_cli.train.loop import StepContext, to_device

    task = task_class(task_name)(image_size=image_size)
    dataset = task.dataset(open_source(str(folder)), seed=0)
    transform = task.batch_transform()
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                        num_workers=0 if dataset.in_memory else args.workers)
    batches = list(loader)[: args.batches]

    def build(index: int, batch) -> list[torch.Tensor]:
        return transform(to_device(batch[0], device), step_generator(0, 0, index, device))

    build(0, batches[0])
    began = time.perf_counter()
    for index, batch in enumerate(batches):
        views = build(index, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    builder = sum(len(batch[0]) for batch in batches) / (time.perf_counter() - began)
    torch.manual_seed(0)
    network = PretextNetwork(build_model(arch, **arch_kwargs), task).to(device).train()
    optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    targets = batches[0][1].to(device)
    context = StepContext(batches[0][2].to(device), 0, 0, 1, ProcessGroup())

    def one_step() -> None:
        with autocast(device):
            loss, _ = task.objective(network.head, network(views), targets, context)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    one_step()
    began = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    consumer = args.steps * len(targets) / (time.perf_counter() - began)
    return {"task": task_name, "arch": arch, "image_size": image_size, "workers": 0 if dataset.in_memory else args.workers,
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
        for arch in ("alexnet_lowres", "resnet18_lowres"):
            rows.append(measure_views("simclr", arch, {}, 32, folder, args, device))
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
