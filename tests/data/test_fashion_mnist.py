"""Tests of the offline Fashion-MNIST idx reader, on synthetic files and on the Debian package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from ssl_cli.data.fashion_mnist import CLASSES, DEFAULT_ROOT, load_split, read_idx


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Encode an array as an idx file independently of the reader: header by hand, big-endian."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path: Path, payload: bytes, gzipped: bool) -> Path:
    if gzipped:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _tiny_split(root: Path, stem: str, n: int, gzipped: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    _write(root / f"{stem}-images-idx3-ubyte", _idx_bytes(images), gzipped)
    _write(root / f"{stem}-labels-idx1-ubyte", _idx_bytes(labels), gzipped)
    return images, labels


@pytest.mark.parametrize("gzipped", [True, False])
def test_read_idx_round_trips_uint8(tmp_path: Path, gzipped: bool) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = _write(tmp_path / "a-idx3-ubyte", _idx_bytes(array), gzipped)
    read = read_idx(path)
    assert read.dtype == np.uint8 and read.shape == (2, 3, 5)
    assert np.array_equal(read, array)
    assert read.flags.writeable


def test_read_idx_decodes_big_endian_wider_types(tmp_path: Path) -> None:
    array = np.array([[1, -2, 70000], [0, 3, -70000]], dtype=np.int32)
    read = read_idx(_write(tmp_path / "b-idx2-int", _idx_bytes(array, type_code=0x0C), gzipped=False))
    assert read.dtype == np.int32 and read.dtype.isnative
    assert np.array_equal(read, array)


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x01\x08\x01" + (3).to_bytes(4, "big") + b"abc", "not an idx file, magic is 00 01 08 01"),
        (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "not an idx file"),
        (b"\x00\x00", "truncated idx file"),
        (b"\x00\x00\x08\x03" + (10).to_bytes(4, "big"), "truncated idx header"),
        (b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"abc", "truncated idx file, 11 bytes"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc", "trailing bytes"),
    ],
    ids=["nonzero-magic", "unknown-type", "short-magic", "short-header", "short-payload", "trailing"],
)
def test_read_idx_refuses_malformed_files(
    tmp_path: Path, payload: bytes, message: str, gzipped: bool
) -> None:
    path = _write(tmp_path / "bad-idx", payload, gzipped)
    with pytest.raises(ValueError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_read_idx_refuses_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "cut-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros(1000, dtype=np.uint8)))[:20])
    with pytest.raises(ValueError, match="corrupt gzip stream"):
        read_idx(path)


@pytest.mark.parametrize("gzipped", [True, False])
def test_load_split_reads_both_splits(tmp_path: Path, gzipped: bool) -> None:
    train_images, train_labels = _tiny_split(tmp_path, "train", 7, gzipped, seed=1)
    test_images, test_labels = _tiny_split(tmp_path, "t10k", 4, gzipped, seed=2)

    images, labels = load_split(tmp_path, "train")
    assert images.shape == (7, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (7,) and labels.dtype == np.int64
    assert np.array_equal(images, train_images) and np.array_equal(labels, train_labels)

    images, labels = load_split(tmp_path, "test")
    assert np.array_equal(images, test_images) and np.array_equal(labels, test_labels)


def test_load_split_names_the_missing_file_and_the_package(tmp_path: Path) -> None:
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(np.zeros((2, 28, 28), np.uint8)), True)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as caught:
        load_split(tmp_path, "test")
    assert "apt-get install dataset-fashion-mnist" in str(caught.value)


def test_load_split_refuses_mismatched_counts(tmp_path: Path) -> None:
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(np.zeros((3, 28, 28), np.uint8)), True)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(np.zeros(2, np.uint8)), True)
    with pytest.raises(ValueError, match="3 images .* but 2 labels"):
        load_split(tmp_path, "test")


def test_load_split_refuses_labels_out_of_range(tmp_path: Path) -> None:
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(np.zeros((2, 28, 28), np.uint8)), True)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(np.array([3, 10], np.uint8)), True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        load_split(tmp_path, "test")


def test_load_split_refuses_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use one of train, test"):
        load_split(tmp_path, "validation")


def test_installed_test_split() -> None:
    if not DEFAULT_ROOT.is_dir():
        pytest.skip(f"{DEFAULT_ROOT} absent; `apt-get install dataset-fashion-mnist` provides it")
    images, labels = load_split(DEFAULT_ROOT, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    # The official test split holds exactly 1000 images of each class.
    assert np.array_equal(np.bincount(labels, minlength=len(CLASSES)), np.full(len(CLASSES), 1000))
    assert images.max() == 255 and images.min() == 0
