"""Offline reader of Fashion-MNIST's idx files, as installed by Debian's ``dataset-fashion-mnist``.

Never downloads. Reads the ``.gz`` files the package installs under
``/usr/share/datasets/fashion-mnist`` and the same files un-gzipped (the layout torchvision's
own class keeps under ``FashionMNIST/raw/``).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

# The official label order of Zalando's release: label k is CLASSES[k].
CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]

IMAGE_SIDE = 28

# File name stem of each split; the files themselves are <stem>-images-idx3-ubyte[.gz] and
# <stem>-labels-idx1-ubyte[.gz].
_SPLIT_STEMS = {"train": "train", "test": "t10k"}

# idx type codes (third byte of the magic) to big-endian numpy dtypes, from LeCun's MNIST page.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file, gzipped or not (told apart by content, not by the name's suffix).

    The header is two zero bytes, a type code, the number of dimensions, then each dimension as
    a big-endian uint32; the payload follows in row-major order.

    Returns:
        array: shaped by the header's dimensions, e.g. (N, 28, 28) uint8 for images or (N,) uint8
        for labels, in native byte order and writable.

    Raises:
        ValueError: bad magic, unknown type code, truncated file or trailing bytes; the message
            names the file and what was found.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(f"{path}: corrupt gzip stream ({error})") from error

    if len(raw) < 4:
        raise ValueError(f"{path}: truncated idx file, {len(raw)} bytes is shorter than the 4-byte magic")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an idx file, magic is {raw[:4].hex(' ')}; expected 00 00 <type> <ndim> with "
            f"type one of {', '.join(f'{code:02x}' for code in _IDX_DTYPES)} and ndim >= 1"
        )

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: truncated idx header, {len(raw)} bytes for a header of {header_size} ({ndim} dims)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header_size + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated idx file" if len(raw) < expected else "trailing bytes after idx payload"
        raise ValueError(
            f"{path}: {problem}, {len(raw)} bytes but header {shape} {dtype.name} needs {expected}"
        )

    payload = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    # astype copies: frombuffer's view is read-only, which torch.from_numpy warns about.
    return payload.astype(dtype.newbyteorder("="))


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load the ``"train"`` (60000 images) or ``"test"`` (10000 images) split from ``root``.

    For each file the ``.gz`` name is tried first, then the un-gzipped one.

    Returns:
        images: (N, 28, 28) uint8, white garment on black as in the release.
        labels: (N,) int64 in [0, 10), indexing CLASSES.

    Raises:
        FileNotFoundError: a file is missing; the message names it and how to install the set.
        ValueError: unknown split, or files that do not fit together (counts, shapes, labels).
    """
    if split not in _SPLIT_STEMS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use one of {', '.join(_SPLIT_STEMS)}")
    root = Path(root)
    stem = _SPLIT_STEMS[split]
    images_path = _find_idx(root, f"{stem}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{stem}-labels-idx1-ubyte")

    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"{images_path}: expected (N, {IMAGE_SIDE}, {IMAGE_SIDE}) uint8 images, "
            f"found {images.shape} {images.dtype}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected (N,) labels, found shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split} split under {root}: {len(images)} images in {images_path.name} "
            f"but {len(labels)} labels in {labels_path.name}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(
            f"{labels_path}: labels must lie in [0, {len(CLASSES)}), found {labels.min()}..{labels.max()}"
        )
    return images, labels


def _find_idx(root: Path, name: str) -> Path:
    """Path of ``name.gz`` or ``name`` under ``root``, the gzipped one preferred."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / name}.gz (or un-gzipped {name}) not found. "
        f"On Debian/Ubuntu install it with `apt-get install dataset-fashion-mnist` "
        f"(files land in {DEFAULT_ROOT}), or point the reader at a folder holding the idx files."
    )
