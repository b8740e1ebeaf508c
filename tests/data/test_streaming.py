"""Images beyond the memory budget stream with the same pixels, batches and resumed runs as images held in
memory; random resized crops come from the stored image, not from a centre square at the training size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ssl_cli.artifacts.h5 import RowWriter
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.data.batch_augment import BatchAugment, step_generator
from ssl_cli.data.dataset import StoreRows
from ssl_cli.data.resized import PackedBatch, ResizedImages, stored_side, to_uint8
from ssl_cli.data.sources import open_source
from ssl_cli.data.views import make_views, view_recipe
from ssl_cli.train.loop import TrainOptions, epoch_loader, train
from ssl_cli.train.sampler import EpochSampler


def write_store(path: Path, pixels: np.ndarray, chunk_rows: int = 8) -> Path:
    """An images store of `pixels` (N, H, W, C) uint8 laid out as `ssl pack` writes one (chunks of rows)."""
    provenance = make_provenance("images", "test", {}, {"n": len(pixels)}, [])
    writer = RowWriter.create(path, provenance, {"images": (pixels.shape[1:], np.uint8), "sample_ids": ((), str),
                                                 "targets": ((), np.int64)}, chunk_rows=chunk_rows)
    for start in range(0, len(pixels), 16):  # several appends: chunks interleaved with HDF5's own metadata
        block = pixels[start:start + 16]
        writer.append(images=block, sample_ids=np.array([f"{i:03d}" for i in range(start, start + len(block))],
                                                        dtype=object),
                      targets=np.arange(start, start + len(block)) % 3)
    writer.set_attrs(classes=["a", "b", "c"])
    return writer.commit()


def noise(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.mark.parametrize("size, channels", [(16, 3), (12, 3), (16, 1)])
def test_store_rows_stream_the_pixels_the_source_loads(tmp_path, size, channels):
    """Rows copied out of the file (any order, repeats), resized or not, grey or colour: what `to_uint8` makes
    of `source.load(i)`, in memory and streamed alike."""
    source = open_source(str(write_store(tmp_path / "s.h5", noise(40, 16, channels))))
    rows = np.array([39, 0, 7, 7, 23, 8, 1], dtype=np.int64)
    assert np.array_equal(StoreRows(source.path).read(rows), noise(40, 16, channels)[rows])
    want = torch.stack([to_uint8(source.load(int(i)), size) for i in rows])
    held, streamed = (ResizedImages(source, rows, source.targets[rows], size, memory_budget=budget)
                      for budget in (1 << 30, 0))
    assert held.in_memory and not streamed.in_memory and streamed.read_in_threads
    for dataset in (held, streamed):
        images, labels, positions, ok = dataset.batch(list(range(len(rows))))
        assert torch.equal(images, want) and torch.equal(labels, torch.from_numpy(source.targets[rows]))
        assert positions.tolist() == list(range(len(rows))) and bool(ok.all())
        assert torch.equal(dataset[2][0], want[2])


def resident_file_bytes() -> int:
    """This process's file-backed resident pages (RssFile of /proc/self/status), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_store_rows_release_the_pages_they_read(tmp_path, monkeypatch):
    """An epoch over a store bigger than memory must not keep every page it read in the process: rows read
    from the map leave the resident set every RELEASE_BYTES (they stay in the page cache)."""
    import ssl_cli.data.dataset as dataset

    path = write_store(tmp_path / "s.h5", noise(1024, 64), chunk_rows=64)  # 12 MiB of rows
    order = np.random.default_rng(0).permutation(1024)
    grown = {}
    for release in (2**40, 2**20):
        monkeypatch.setattr(dataset, "RELEASE_BYTES", release)
        rows, before = StoreRows(path), resident_file_bytes()
        for start in range(0, 1024, 64):
            rows.read(order[start:start + 64])
        grown[release] = resident_file_bytes() - before
        del rows
    assert grown[2**40] >= 10 * 2**20  # kept: the whole store is resident
    assert grown[2**20] <= 3 * 2**20   # released: about one RELEASE_BYTES stays


def test_a_compressed_store_is_read_through_h5py(tmp_path):
    import h5py

    path = write_store(tmp_path / "s.h5", noise(20, 8))
    with h5py.File(path, "a") as handle:  # the same rows, gzip-compressed
        pixels = handle["images"][...]
        del handle["images"]
        handle.create_dataset("images", data=pixels, chunks=(4, 8, 8, 3), compression="gzip")
    rows = StoreRows(path)
    assert np.array_equal(rows.read([5, 19, 0]), pixels[[5, 19, 0]]) and rows._starts is None


def epoch(dataset, workers: int, epoch_index: int = 0, start: int = 0) -> list[list[torch.Tensor]]:
    options = TrainOptions(epochs=1, batch_size=8, lr=0.1, seed=3, workers=workers)
    sampler = EpochSampler(len(dataset), 3, epoch_index, start=start)
    return [list(batch) for batch in epoch_loader(dataset, sampler, options, torch.device("cpu"))]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) == 4 and all(torch.equal(p, q) for p, q in zip(x, y))
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["store", "folder"])
def test_streamed_epochs_are_the_in_memory_batches(tmp_path, kind):
    """Same images, same order for a seed, mid-epoch start included: threads over a store, worker processes
    (a `PackedBatch` per batch) over a folder, and the caller's thread with 0 workers."""
    pixels = noise(48, 20)
    if kind == "store":
        spec = str(write_store(tmp_path / "s.h5", pixels))
    else:
        for i, image in enumerate(pixels):
            (tmp_path / "f" / "abc"[i % 3]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp_path / "f" / "abc"[i % 3] / f"{i:02d}.png")
        spec = str(tmp_path / "f")
    source = open_source(spec)
    indices = np.arange(len(source))[::-1].copy()
    held = ResizedImages(source, indices, source.targets[indices], 16)
    streamed = ResizedImages(source, indices, source.targets[indices], 16, memory_budget=0)
    assert held.in_memory and not streamed.in_memory
    want = epoch(held, 0, epoch_index=1)
    assert len(want) == 6 and want[0][0].shape == (8, 3, 16, 16) and want[0][3].dtype == torch.bool
    for workers in (0, 2):
        assert same_batches(epoch(streamed, workers, epoch_index=1), want)
    assert same_batches(epoch(streamed, 2, epoch_index=1, start=24), want[3:])


def test_a_packed_batch_unpacks_to_its_tensors():
    images = torch.randint(0, 256, (3, 3, 5, 5), dtype=torch.uint8)
    labels, positions, ok = torch.tensor([4, 0, 2]), torch.tensor([9, 1, 5]), torch.tensor([True, False, True])
    packed = PackedBatch.pack(images, labels, positions, ok)
    assert packed.block.is_shared() and packed.block.numel() == 16 * 3 + images.numel() + 3
    assert all(torch.equal(a, b) for a, b in zip(packed.unpack(), (images, labels, positions, ok)))


class Step:
    def __init__(self, augment: BatchAugment):
        self.augment = augment

    def __call__(self, model, inputs, targets, context=None):
        output = model(inputs)
        return nn.functional.cross_entropy(output, targets), (output.argmax(1) == targets).float().mean().item()


def run(tmp_path: Path, name: str, dataset, workers: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 3))
    augment = BatchAugment(mean=(0.5,) * 3, std=(0.25,) * 3, min_scale=0.5, shift=1, flip=True, size=16)
    options = TrainOptions(epochs=2, batch_size=8, lr=0.05, seed=1, deterministic=True, workers=workers, device="cpu")
    return train(model, dataset, Step(augment), options, tmp_path / name, make_provenance("checkpoint", "t", {}, {}, []),
                 lambda m: {"model": m.state_dict()}, batch_transform=augment)


def interrupt_after(monkeypatch, steps: int) -> None:
    """The loop saves `.partial` and stops after `steps` steps, as SIGINT would (tests/train has the same;
    its directory is not importable from here)."""
    import ssl_cli.train.loop as loop

    calls, real = {"n": 0}, loop.distributed.any_rank

    def stop_after(flag, group, device):
        calls["n"] += 1
        return real(flag or calls["n"] == steps, group, device)

    monkeypatch.setattr(loop.distributed, "any_rank", stop_after)


def test_a_streamed_run_killed_mid_epoch_resumes_to_the_weights_of_an_in_memory_run(tmp_path, monkeypatch):
    source = open_source(str(write_store(tmp_path / "s.h5", noise(48, 24))))
    indices = np.arange(len(source))
    held = ResizedImages(source, indices, source.targets, 16, stored_size=24)
    streamed = ResizedImages(source, indices, source.targets, 16, memory_budget=0, stored_size=24)
    run(tmp_path, "a.pt", held, 0)
    interrupt_after(monkeypatch, 8)  # epoch 2, step 2 of 6
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "b.pt", streamed, 2)
    monkeypatch.undo()
    assert run(tmp_path, "b.pt", streamed, 2).status == "resumed"
    want, got = (torch.load(tmp_path / name, weights_only=True)["model"] for name in ("a.pt", "b.pt"))
    assert all(torch.equal(want[key], got[key]) for key in want)


def corner_image(size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: flat grey, the top-left quarter a 1-pixel checkerboard. Resized to half the
    side (a 2 x 2 filter), the checkerboard becomes flat grey: it is visible only in the full resolution."""
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    y, x = np.mgrid[: size // 2, : size // 2]
    image[: size // 2, : size // 2] = (((x + y) % 2) * 255)[..., None]
    return image


def detail(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,) the largest mean absolute difference between horizontal neighbours in any row."""
    return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 3)).amax(dim=1)


def test_random_resized_crops_come_from_the_stored_image(tmp_path):
    source = open_source(str(write_store(tmp_path / "s.h5", corner_image()[None].repeat(32, 0))))
    assert stored_side(source, 32, crops=True) == 64 and stored_side(source, 32, crops=False) == 32
    assert stored_side(source, 16, crops=True) == 32  # capped at twice the training side
    rows = np.zeros(32, dtype=np.int64)
    stored = ResizedImages(source, rows, rows, 32, stored_size=stored_side(source, 32, crops=True))
    centre = ResizedImages(source, rows, rows, 32)  # what the crops were taken from before
    assert stored[0][0].shape == (3, 64, 64) and detail(centre[0][0][None].float() / 255).item() < 0.01
    augment = BatchAugment(mean=(0.0,) * 3, std=(1.0,) * 3, min_scale=0.1, flip=False, size=32)
    generator = step_generator(0, 0, 0, torch.device("cpu"))
    from_stored = augment(stored.batch(list(range(32)))[0], generator)
    generator = step_generator(0, 0, 0, torch.device("cpu"))
    from_centre = augment(centre.batch(list(range(32)))[0], generator)
    assert from_stored.shape == from_centre.shape == (32, 3, 32, 32)
    # crops inside the top-left quarter show the checkerboard (about 1:1); the 32 px square has lost it
    assert (detail(from_stored) > 0.05).sum() >= 4 and detail(from_centre).max() < 0.02
    views = make_views(stored.batch(list(range(32)))[0], view_recipe("cifar", 32, min_scale=0.1, jitter_prob=0.0,
                                                                      grey_prob=0.0), generator, count=2)
    assert [tuple(v.shape) for v in views] == [(32, 3, 32, 32)] * 2 and max(detail(v).max() for v in views) > 0.5


def test_at_the_training_size_crops_are_the_plain_warp():
    """Images already at the training size (Fashion-MNIST's 28 px at 32 px: stored at 32) augment pixel for
    pixel as before `size` existed, so existing results do not change."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = BatchAugment(mean=(0.5,) * 3, std=(0.2,) * 3, min_scale=0.3, shift=2, flip=True, color_jitter=0.4)
    sized = BatchAugment(mean=(0.5,) * 3, std=(0.2,) * 3, min_scale=0.3, shift=2, flip=True, color_jitter=0.4, size=32)
    cpu = torch.device("cpu")
    assert torch.equal(plain(images, step_generator(0, 1, 2, cpu)), sized(images, step_generator(0, 1, 2, cpu)))

    class Fashion:  # 28 px images below a 32 px training size: stored at 32 with crops as without
        native_size = 28

    assert stored_side(Fashion(), 32, crops=True) == stored_side(Fashion(), 32, crops=False) == 32
