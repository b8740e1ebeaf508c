"""Image sources behind `--data`: a folder, a packed HDF5 store, Fashion-MNIST from local files.

Every source exposes the same thing: N stable `sample_ids`, `targets` (N,) int64 with -1 for
unknown, the class names, `load(i) -> PIL RGB image` (raises `UnreadableImage`), and a
`fingerprint` that changes when the images change.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ssl_cli.artifacts.h5 import H5Artifact
from ssl_cli.artifacts.schema import file_digest
from ssl_cli.data.spec import parse_source
from ssl_cli.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class UnreadableImage(Exception):
    """An image that cannot be decoded; stages skip it, count it and name it."""


class ImageSource:
    spec: str
    sample_ids: list[str]
    targets: np.ndarray
    classes: list[str]
    native_size: int | None = None  # the side of every image, when the source knows they are all square and equal

    def __len__(self) -> int:
        return len(self.sample_ids)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    @property
    def has_targets(self) -> bool:
        return bool((self.targets >= 0).any())

    def describe(self) -> dict:
        return {"path": self.spec, "fingerprint": self.fingerprint}


class FolderSource(ImageSource):
    """Images under `root`, recursively, in sorted relative-path order.

    Images inside first-level subfolders take the subfolder as their class; images directly in
    `root` have no target (-1).
    """

    def __init__(self, root: Path, flag: str = "--data"):
        self.spec = str(root)
        self.root = root
        paths = sorted(
            path.relative_to(root).as_posix()
            for path in root.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        )
        if not paths:
            others = sum(1 for path in root.rglob("*") if path.is_file())
            found = f"{others} other file(s)" if others else "nothing"
            raise UserError(
                f"no images under {root} (found {found}; looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                f"point {flag} at a folder of images"
            )
        self.sample_ids = paths
        self.classes = sorted({path.split("/")[0] for path in paths if "/" in path})
        index = {name: i for i, name in enumerate(self.classes)}
        self.targets = np.array([index[p.split("/")[0]] if "/" in p else -1 for p in paths], dtype=np.int64)

    def load(self, index: int) -> Image.Image:
        path = self.root / self.sample_ids[index]
        try:
            with Image.open(path) as image:
                image.load()
                return as_viewed(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableImage(f"{self.sample_ids[index]}: {error}") from None

    @cached_property
    def fingerprint(self) -> str:
        # Paths and sizes, not contents: hashing 1.3M images would cost more than the stage.
        digest = hashlib.sha256()
        for relative in self.sample_ids:
            digest.update(f"{relative}\0{os.path.getsize(self.root / relative)}\n".encode())
        return digest.hexdigest()


def as_viewed(image: Image.Image) -> Image.Image:
    """An opened image as RGB the way image viewers show it: turned upright by its EXIF orientation, and
    16/32-bit grey (modes I;16, I) scaled to 8 bits, where `convert("RGB")` would clip every value above 255
    (a 16-bit PNG came out almost all white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        # I;16 is 0..65535; mode I holds 16-bit PNGs too, and 8-bit data when nothing exceeds 255
        full_scale = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(pixels * (255.0 / full_scale)), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


class H5ImageSource(ImageSource):
    """A packed store: `images` uint8 (N,H,W,C), `sample_ids`, optional `targets`.

    The HDF5 handle is opened lazily in whichever process reads, so DataLoader workers never
    share a handle across a fork.
    """

    def __init__(self, path: Path):
        self.spec = str(path)
        self.path = path
        with H5Artifact(path, "images", required=("images", "sample_ids")) as store:
            self.sample_ids = list(store.strings("sample_ids"))
            self.targets = store.array("targets").astype(np.int64) if "targets" in store else np.full(len(self.sample_ids), -1, np.int64)
            self.classes = list(store.attrs.get("classes", []))
            self._fingerprint = store.fingerprint
            self.shape = tuple(store["images"].shape)
            self.dtype = store["images"].dtype
        self._handle: H5Artifact | None = None
        self._pid = -1

    @property
    def native_size(self) -> int | None:
        return int(self.shape[1]) if len(self.shape) >= 3 and self.shape[1] == self.shape[2] else None

    def load(self, index: int) -> Image.Image:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = H5Artifact(self.path, "images"), os.getpid()
        pixels = self._handle["images"][index]
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        return Image.fromarray(pixels).convert("RGB")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": -1}

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


class FashionMNISTSource(ImageSource):
    """Fashion-MNIST from the local idx files (Debian's dataset-fashion-mnist); never downloads."""

    def __init__(self, root: Path, split: str):
        from ssl_cli.data.fashion_mnist import CLASSES, load_split

        if split not in ("train", "test"):
            raise UserError(f"fashion-mnist split must be train or test, got {split!r}")
        try:
            self.images, targets = load_split(root, split)
        except FileNotFoundError as error:
            raise UserError(str(error)) from None
        except ValueError as error:
            raise UserError(f"fashion-mnist files in {root} are damaged: {error}") from None
        self.spec = f"fashion-mnist:{root}:{split}"
        self.root, self.split = root, split
        self.targets = targets.astype(np.int64)
        self.sample_ids = [f"{split}/{i:05d}" for i in range(len(self.targets))]
        self.classes = list(CLASSES)

    native_size = 28

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.split.encode())
        digest.update(self.images.tobytes())
        digest.update(self.targets.tobytes())
        return digest.hexdigest()


def open_source(spec: str, flag: str = "--data") -> ImageSource:
    """Parse a `--data` value (or that of `flag`: --unlabelled, --eval-data) into a source; a bad value gets an
    error naming the flag and listing the accepted forms (`data.spec.parse_source`, also the early check)."""
    try:
        parsed = parse_source(spec, flag)
    except ValueError as error:
        raise UserError(str(error)) from None
    if parsed.kind == "fashion-mnist":
        return FashionMNISTSource(parsed.path, parsed.split)
    if parsed.kind == "folder":
        return FolderSource(parsed.path, flag)
    return H5ImageSource(parsed.path)


def source_input(source: ImageSource) -> dict[str, str]:
    """The `{path, fingerprint}` record of a source for an artifact's `inputs`."""
    return {"path": source.spec, "fingerprint": source.fingerprint}


def weights_input(path: Path) -> dict[str, str]:
    return {"path": str(path), "fingerprint": file_digest(path)}
