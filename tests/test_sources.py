"""Image sources behind `--data`: folders, packed HDF5 stores, Fashion-MNIST, and the DataLoader path."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ssl_cli.data.dataset import SourceDataset
from ssl_cli.data.sources import (
    FashionMNISTSource,
    FolderSource,
    H5ImageSource,
    UnreadableImage,
    open_source,
    source_input,
)
from ssl_cli.data.transforms import eval_transform
from ssl_cli.errors import UserError

FM_ROOT = Path("/usr/share/datasets/fashion-mnist")


def _png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


# --- folders --------------------------------------------------------------------------------------


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    _png(tmp_path / "dog" / "b.png", 1)
    _png(tmp_path / "cat" / "z.png", 2)
    _png(tmp_path / "cat" / "a.jpg", 3)
    _png(tmp_path / "dog" / "a.png", 4)
    (tmp_path / "cat" / "readme.txt").write_text("not an image")
    source = open_source(str(tmp_path))
    assert isinstance(source, FolderSource)
    assert source.sample_ids == ["cat/a.jpg", "cat/z.png", "dog/a.png", "dog/b.png"]
    assert source.classes == ["cat", "dog"]
    assert source.targets.tolist() == [0, 0, 1, 1]
    assert source.targets.dtype == np.int64 and source.has_targets
    assert np.asarray(source.load(3))[0, 0].tolist() == [1, 1, 1]
    assert source.load(2).mode == "RGB"


def test_flat_folder_has_no_targets(tmp_path: Path) -> None:
    for name, value in (("b.png", 1), ("a.png", 2), ("C.PNG", 3)):
        _png(tmp_path / name, value)
    source = open_source(str(tmp_path))
    assert source.sample_ids == ["C.PNG", "a.png", "b.png"]  # sorted, upper-case suffixes count
    assert source.targets.tolist() == [-1, -1, -1]
    assert source.classes == [] and not source.has_targets


def test_folder_is_recursive_and_the_first_level_names_the_class(tmp_path: Path) -> None:
    _png(tmp_path / "bird" / "2019" / "june" / "x.png", 1)
    _png(tmp_path / "bird" / "y.png", 2)
    _png(tmp_path / "fish" / "deep" / "z.png", 3)
    _png(tmp_path / "loose.png", 4)
    source = open_source(str(tmp_path))
    assert source.sample_ids == ["bird/2019/june/x.png", "bird/y.png", "fish/deep/z.png", "loose.png"]
    assert source.targets.tolist() == [0, 0, 1, -1]


def test_folder_ids_are_stable(toy_dir: Path) -> None:
    first, second = open_source(str(toy_dir)), open_source(str(toy_dir))
    assert first.sample_ids == second.sample_ids == sorted(first.sample_ids)
    assert first.fingerprint == second.fingerprint
    assert len(first) == 96 and sorted(set(first.targets.tolist())) == [0, 1, 2, 3]
    # the toy folders are named so that the class order is the label order
    assert [name[:3] for name in first.classes] == ["c00", "c01", "c02", "c03"]
    assert source_input(first) == {"path": str(toy_dir), "fingerprint": first.fingerprint}


def test_unreadable_image_raises_unreadable_image(tmp_path: Path) -> None:
    _png(tmp_path / "good.png", 5)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    source = open_source(str(tmp_path))
    with pytest.raises(UnreadableImage, match="bad.png"):
        source.load(source.sample_ids.index("bad.png"))
    dataset = SourceDataset(source, eval_transform(8), placeholder_shape=(3, 8, 8))
    image, _, ok = dataset[source.sample_ids.index("bad.png")]
    assert not ok and image.shape == (3, 8, 8)
    assert dataset[source.sample_ids.index("good.png")][2]


# --- packed HDF5 stores ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory, cli) -> Path:
    out = tmp_path_factory.mktemp("packed") / "images.h5"
    result = cli("pack", "--data", toy_dir, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    return out


def test_pack_round_trip_gives_the_folder_back(toy_dir: Path, packed: Path) -> None:
    folder, store = open_source(str(toy_dir)), open_source(str(packed))
    assert isinstance(store, H5ImageSource)
    assert store.sample_ids == folder.sample_ids
    np.testing.assert_array_equal(store.targets, folder.targets)
    assert store.classes == folder.classes
    for index in range(len(folder)):
        np.testing.assert_array_equal(np.asarray(store.load(index)), np.asarray(folder.load(index)))
    with h5py.File(packed, "r") as handle:
        assert handle.attrs["schema"] == "ssl-cli/images@1.0"
        assert handle["images"].dtype == np.uint8 and handle["images"].shape == (96, 32, 32, 3)


def test_pack_again_is_up_to_date(cli, toy_dir: Path, packed: Path) -> None:
    mtime = packed.stat().st_mtime_ns
    result = cli("pack", "--data", toy_dir, "--out", packed, "--no-progress")
    assert result.exit_code == 0 and "up to date" in result.output
    assert packed.stat().st_mtime_ns == mtime


def test_pack_with_resize(cli, toy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.h5"
    assert cli("pack", "--data", toy_dir, "--out", out, "--image-size", 16, "--no-progress").exit_code == 0
    store = open_source(str(out))
    assert store.shape == (96, 16, 16, 3) and store.load(0).size == (16, 16)


def test_features_from_a_store_equal_features_from_its_folder(toy_dir: Path, packed: Path, extract_cfg,
                                                              features_h5: Path, tmp_path: Path) -> None:
    from ssl_cli.stages import extract

    out = tmp_path / "f.h5"
    extract.run(extract_cfg(packed, out))
    with h5py.File(out, "r") as got, h5py.File(features_h5, "r") as want:
        np.testing.assert_array_equal(got["features"][...], want["features"][...])
        assert list(got["sample_ids"].asstr()[...]) == list(want["sample_ids"].asstr()[...])
        np.testing.assert_array_equal(got["targets"][...], want["targets"][...])


def test_store_handle_is_opened_lazily_and_never_pickled(packed: Path) -> None:
    store = open_source(str(packed))
    assert store._handle is None, "the constructor must not keep a handle a fork would share"
    store.load(0)
    assert store._handle is not None and store._pid == os.getpid()
    clone = pickle.loads(pickle.dumps(store))
    assert clone._handle is None and clone._pid == -1
    np.testing.assert_array_equal(np.asarray(clone.load(5)), np.asarray(store.load(5)))


class _PidDataset(Dataset):
    """Wraps a SourceDataset and reports which process read each item and with which handle."""

    def __init__(self, inner: SourceDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, position: int):
        image, index, ok = self.inner[position]
        handle = self.inner.source._handle
        return image, index, ok, os.getpid(), handle.file.id.id if handle is not None else -1


def test_store_in_a_dataloader_with_two_workers(packed: Path) -> None:
    store = open_source(str(packed))
    store.load(0)  # the parent holds an open handle before forking: workers must not reuse it
    dataset = SourceDataset(store, eval_transform(32), placeholder_shape=(3, 32, 32))
    loader = DataLoader(_PidDataset(dataset), batch_size=8, num_workers=2, shuffle=False)
    images, indices, pids = [], [], set()
    for batch_images, batch_indices, ok, batch_pids, _ in loader:
        assert ok.all()
        images.append(batch_images)
        indices.append(batch_indices)
        pids.update(batch_pids.tolist())
    assert len(pids) == 2 and os.getpid() not in pids
    indices = torch.cat(indices)
    assert indices.tolist() == list(range(len(store)))
    serial = torch.stack([dataset[i][0] for i in range(len(store))])
    assert torch.equal(torch.cat(images), serial)


def test_an_images_store_of_the_wrong_kind(features_h5: Path) -> None:
    with pytest.raises(UserError, match="holds features, expected images"):
        open_source(str(features_h5))


# --- Fashion-MNIST --------------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    splits = {}
    for split, stem, n in (("train", "train", 7), ("test", "t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (root / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (root / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
        splits[split] = (images, labels)
    return root, splits


@pytest.mark.parametrize(("suffix", "split"), [("", "train"), (":train", "train"), (":test", "test")])
def test_fashion_mnist_spec_parsing(tiny_fashion, suffix: str, split: str) -> None:
    root, splits = tiny_fashion
    source = open_source(f"fashion-mnist:{root}{suffix}")
    assert isinstance(source, FashionMNISTSource)
    assert source.split == split and source.root == root
    images, labels = splits[split]
    assert len(source) == len(labels)
    assert source.sample_ids == [f"{split}/{i:05d}" for i in range(len(labels))]
    np.testing.assert_array_equal(source.targets, labels.astype(np.int64))
    pixels = np.asarray(source.load(2))
    assert pixels.shape == (28, 28, 3)
    np.testing.assert_array_equal(pixels[..., 0], images[2])
    assert source.spec == f"fashion-mnist:{root}:{split}"


def test_fashion_mnist_folder_with_a_colon_in_its_name(tiny_fashion, tmp_path: Path) -> None:
    root, _ = tiny_fashion
    odd = tmp_path / "data:v2"
    root.rename(odd)
    assert open_source(f"fashion-mnist:{odd}").split == "train"
    assert open_source(f"fashion-mnist:{odd}:test").split == "test"


def test_fashion_mnist_bad_split(tiny_fashion) -> None:
    root, _ = tiny_fashion
    with pytest.raises(UserError, match="split must be train or test, got 'valid'"):
        open_source(f"fashion-mnist:{root}:valid")


def test_fashion_mnist_splits_have_different_fingerprints(tiny_fashion) -> None:
    root, _ = tiny_fashion
    assert open_source(f"fashion-mnist:{root}:train").fingerprint != open_source(f"fashion-mnist:{root}:test").fingerprint


@pytest.mark.skipif(not FM_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist_test_split() -> None:
    source = open_source(f"fashion-mnist:{FM_ROOT}:test")
    assert len(source) == 10_000
    assert source.sample_ids[0] == "test/00000" and source.sample_ids[-1] == "test/09999"
    assert len(set(source.sample_ids)) == 10_000
    assert source.targets.dtype == np.int64
    assert np.bincount(source.targets, minlength=10).tolist() == [1000] * 10
    assert source.classes[0] == "t-shirt/top" and len(source.classes) == 10
    image = source.load(0)
    assert image.size == (28, 28) and image.mode == "RGB"
    # the published first test item is an ankle boot (label 9)
    assert source.targets[0] == 9


def test_pack_with_a_limit_keeps_the_first_n_images(cli, toy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "first.h5"
    assert cli("pack", "--data", toy_dir, "--out", out, "--limit", 10, "--no-progress").exit_code == 0
    store, folder = open_source(str(out)), open_source(str(toy_dir))
    assert list(store.sample_ids) == list(folder.sample_ids[:10])
    assert store.targets.tolist() == folder.targets[:10].tolist()
