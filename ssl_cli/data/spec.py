"""What a `--data` value names, read without opening anything heavy, so a bad value is reported
before torch loads, together with every other bad setting of the command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SOURCE_FORMS = "a folder of images, an images .h5 written by `ssl pack`, or fashion-mnist:DIR[:train|test]"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "folder", "h5", "fashion-mnist"
    path: Path
    split: str | None = None


def looks_hdf5(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == HDF5_MAGIC


def parse_source(spec: str, flag: str = "--data") -> SourceSpec:
    """The source a `--data` value names; ValueError (saying what to pass) when it names none."""
    if spec.startswith("fashion-mnist:"):
        rest = spec[len("fashion-mnist:"):]
        root, colon, split = rest.rpartition(":")
        # A trailing `:word` is a split (checked by the source, so `:valid` is named as a bad
        # split rather than read as part of a folder name); an existing folder wins.
        if not colon or "/" in split or Path(rest).is_dir():
            root, split = rest, "train"
        return SourceSpec("fashion-mnist", Path(root) if root else FASHION_MNIST_DIR, split or "train")
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"{flag} {spec} does not exist; pass {SOURCE_FORMS}")
    if path.is_dir():
        return SourceSpec("folder", path)
    if path.suffix.lower() in (".h5", ".hdf5") or looks_hdf5(path):
        return SourceSpec("h5", path)
    raise ValueError(f"{flag} {spec} is a file but not an images .h5; pass {SOURCE_FORMS}")


def check_source(spec: str, flag: str = "--data") -> None:
    """Raise ValueError unless `spec` names a source whose files are there (contents are checked on open)."""
    parsed = parse_source(spec, flag)
    if parsed.kind == "fashion-mnist":
        if not parsed.path.is_dir():
            raise ValueError(f"{flag} {spec}: folder {parsed.path} does not exist; `sudo apt-get install "
                             f"dataset-fashion-mnist` puts the idx files in {FASHION_MNIST_DIR}")
        if parsed.split not in ("train", "test"):
            raise ValueError(f"{flag} {spec}: fashion-mnist split must be train or test, got {parsed.split!r}")
