"""Images beyond the memory budget: the streaming path's images/s against the in-memory path's, same images.

The training loop holds a set's uint8 images in memory when they fit `ResizedImages`' budget and reads
them in the loop's own process; beyond it (ImageNet at 224 px is 190 GB) they stream from the packed
store through `--workers` DataLoader processes, a batch per `StoreRows.read`. Both paths give the same
batches in the same order (tests/data/test_streaming.py); this measures what streaming costs. For each
image side, on one packed store of N images (written here as `ssl pack` writes one: uncompressed
chunks of 64 rows; noise pixels, since an uncompressed read does not depend on them; or --store), this
prints, interleaved and repeated (medians):

  memory    = images/s of an epoch from the in-memory path (the loop's `epoch_loader`, 0 workers)
  stream    = the same epoch order with the budget at 0: the loop's `epoch_loader`, --workers workers
  ratio     = stream / memory (target >= 0.9)

for two consumers of the batches: `bare` (a loop that touches each batch: a sum over one pixel of every
image) and `step` (BatchAugment's flip and shift plus a forward/backward/SGD step of alexnet_bn_lowres
at width 0.25, on --step-images of the epoch at 32 px, fewer by the area above). Rates are steady
state: from the first batch in hand to the last (start-up is left out: once per epoch of 1.28M images).

    python bench/streaming.py                          # 50k x 32 px and 20k x 96 px, 3 repeats
    python bench/streaming.py --sizes 32 --n 20000 --repeats 1
    python bench/streaming.py --store imagenet96.h5 --sizes 96 --device cuda
    python bench/streaming.py --kinds store folder --sizes 32 --n 20000   # a folder of PNGs streams too
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssl_cli.artifacts.h5 import RowWriter
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.data.batch_augment import BatchAugment, step_generator
from ssl_cli.data.resized import ResizedImages
from ssl_cli.data.sources import open_source
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.device import resolve_device
from ssl_cli.models.registry import build_model
from ssl_cli.train.loop import TrainOptions, epoch_loader
from ssl_cli.train.sampler import EpochSampler

BATCH = 64
PACK_CHUNK_ROWS = 64  # as stages/pack.py writes a store
WRITE_BLOCK = 2048


def write_store(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """An images store of n noise images (n, size, size, 3) uint8, laid out as `ssl pack` writes one."""
    provenance = make_provenance("images", "bench-streaming", {"n": n, "size": size}, {"n": n, "size": size}, [])
    writer = RowWriter.create(path, provenance, {"images": ((size, size, 3), np.uint8), "sample_ids": ((), str),
                                                 "targets": ((), np.int64)}, chunk_rows=PACK_CHUNK_ROWS)
    rng = np.random.default_rng(seed)
    for start in range(0, n, WRITE_BLOCK):
        rows = min(WRITE_BLOCK, n - start)
        writer.append(images=rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
                      sample_ids=np.array([f"{i:07d}" for i in range(start, start + rows)], dtype=object),
                      targets=(np.arange(start, start + rows) % 10).astype(np.int64))
    writer.set_attrs(classes=[str(c) for c in range(10)])
    return writer.commit()


def bare(loader, device: torch.device, limit: int | None) -> float:
    """Steady-state images/s of a loop that moves each batch to `device` and reads one pixel of every image."""
    return consume(loader, lambda images, labels, step: images.to(device, non_blocking=True)[:, 0, 0, 0].sum().item(),
                   limit)


def training_step(size: int, device: torch.device):
    torch.manual_seed(0)
    model = build_model("alexnet_bn_lowres", num_classes=10, width=0.25).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    augment = BatchAugment(mean=IMAGENET_MEAN, std=IMAGENET_STD, shift=size / 14, flip=True)

    def step(images: torch.Tensor, labels: torch.Tensor, index: int) -> None:
        x = augment(images.to(device, non_blocking=True), step_generator(0, 0, index, device))
        loss = torch.nn.functional.cross_entropy(model(x), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def consume(loader, work, limit: int | None) -> float:
    began, images_seen = None, 0
    for index, (images, labels, _, _) in enumerate(loader):
        work(images, labels, index)
        if began is None:  # the clock starts with the first batch in hand
            began = time.perf_counter()
            continue
        images_seen += len(images)
        if limit is not None and images_seen >= limit:
            break
    return images_seen / max(time.perf_counter() - began, 1e-9)


def measure(store: Path, size: int, workers: int, repeats: int, step_images: int, device: torch.device,
            consumers: list[str]) -> dict:
    source = open_source(str(store))  # an images store, or a folder of PNGs (decoded in the workers)
    indices = np.arange(len(source))
    labels = source.targets.astype(np.int64)
    loaded = time.perf_counter()
    in_memory = ResizedImages(source, indices, labels, size)
    load_seconds = time.perf_counter() - loaded
    streaming = ResizedImages(source, indices, labels, size, memory_budget=0)
    if not in_memory.in_memory or streaming.in_memory:
        raise SystemExit(f"{len(source)} images at {size} px do not fit the default memory budget; use a smaller --n")
    options = TrainOptions(epochs=1, batch_size=BATCH, lr=0.01, workers=workers)
    rates: dict[str, dict[str, list[float]]] = {c: {"memory": [], "stream": []} for c in consumers}
    for repeat in range(repeats):
        for consumer in consumers:
            for path, dataset in (("memory", in_memory), ("stream", streaming)):  # interleaved
                loader = epoch_loader(dataset, EpochSampler(len(dataset), 0, repeat), options, device)
                if consumer == "bare":
                    rate = bare(loader, device, None)
                else:  # fewer images at larger sides: the step's cost grows with the area
                    images = max(10 * BATCH, step_images * 32 ** 2 // size ** 2)
                    rate = consume(loader, training_step(size, device), images)
                rates[consumer][path].append(rate)
                print(f"  {size} px {consumer:4s} {path:6s} repeat {repeat + 1}: {rate:,.0f} img/s", flush=True)
    table = {}
    for consumer, by_path in rates.items():
        memory, stream = statistics.median(by_path["memory"]), statistics.median(by_path["stream"])
        table[consumer] = {"memory": memory, "stream": stream, "ratio": stream / memory,
                           "memory_all": by_path["memory"], "stream_all": by_path["stream"]}
    return {"size": size, "n": len(source), "kind": "folder" if store.is_dir() else "store", "workers": workers,
            "load_into_memory_seconds": load_seconds, "consumers": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="images per size (default: 50000 at <= 32 px, 20000 above)")
    parser.add_argument("--store", type=Path, default=None, help="an existing images store (one --sizes value)")
    parser.add_argument("--kinds", nargs="+", default=["store"], choices=["store", "folder"],
                        help="what streams: an images store, or a folder of toy PNGs (decoded in the workers)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-images", type=int, default=3200, help="images per training-step measurement at 32 px")
    parser.add_argument("--consumers", nargs="+", default=["bare", "step"], choices=["bare", "step"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for position, size in enumerate(args.sizes):
            n = args.n[min(position, len(args.n) - 1)] if args.n else (50_000 if size <= 32 else 20_000)
            for kind in args.kinds:
                if kind == "folder":  # toy PNGs: noise would compress badly and decode unlike photographs
                    store = Path(tmp) / f"toy-{size}px"
                    write_toy_folder(store, n, classes=10, size=size, seed=0, workers=2)
                else:
                    store = args.store or write_store(Path(tmp) / f"noise-{size}px.h5", n, size)
                results.append(measure(store, size, args.workers, args.repeats, args.step_images, device,
                                       args.consumers))
    print(f"\n{'kind':>6} {'size':>5} {'n':>7} {'consumer':>8} {'memory img/s':>13} {'stream img/s':>13} {'ratio':>6}")
    for row in results:
        for consumer, figures in row["consumers"].items():
            print(f"{row['kind']:>6} {row['size']:>5} {row['n']:>7} {consumer:>8} {figures['memory']:>13,.0f} "
                  f"{figures['stream']:>13,.0f} {figures['ratio']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
