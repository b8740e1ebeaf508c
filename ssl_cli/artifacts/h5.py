"""HDF5 artifacts: validated readers and a chunked, resumable writer. The only module importing h5py.

Layout: provenance as root attributes (see `schema.Provenance`), one dataset per array. Row
datasets (`sample_ids`, `features`, `labels`, ...) are extendible along axis 0 and grow by
`append`; the root attribute `rows_done` says how many rows are whole, so a writer killed
mid-append resumes from there and ignores anything beyond it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from ssl_cli.artifacts.schema import Provenance, check_schema
from ssl_cli.errors import UserError

STRING = h5py.string_dtype("utf-8")


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def read_root_attrs(path: Path) -> dict[str, Any]:
    """Root attributes of an HDF5 file, with JSON fields decoded. Raises OSError if unreadable."""
    with h5py.File(path, "r") as handle:
        return _decoded({key: _plain(value) for key, value in handle.attrs.items()})


# Attributes that `RowWriter.set_attrs` stores as JSON (it encodes every dict and list).
JSON_ATTRS = ("config", "inputs", "metrics", "classes")


def _decoded(attrs: dict[str, Any]) -> dict[str, Any]:
    for key in JSON_ATTRS:
        if isinstance(attrs.get(key), str):
            try:
                attrs[key] = json.loads(attrs[key])
            except json.JSONDecodeError:
                pass
    return attrs


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class H5Artifact:
    """A validated, read-only HDF5 artifact. Use as a context manager or call `close()`.

    Opening is lazy-friendly: create one per process (or DataLoader worker), never share a
    handle across a fork.
    """

    def __init__(self, path: Path, kind: str, required: tuple[str, ...] = ()):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist; check the path or run the stage that writes it")
        if self.path.is_dir() or not h5py.is_hdf5(self.path):
            raise UserError(
                f"{self.path} is not an HDF5 file (expected an ssl-cli {kind} artifact); "
                "pass the .h5 file written by an ssl command"
            )
        self.file = h5py.File(self.path, "r")
        schema = self.file.attrs.get("schema")
        check_schema(_plain(schema) if schema is not None else None, kind, self.path)
        missing = [name for name in required if name not in self.file]
        if missing:
            found = ", ".join(sorted(self.file)) or "none"  # read before closing: a closed file has no members
            self.file.close()
            raise UserError(
                f"{self.path} lacks the dataset(s) {', '.join(missing)} that a {kind} artifact must have "
                f"(found: {found}); the file is damaged, recompute it"
            )
        self.kind = kind

    @property
    def attrs(self) -> dict[str, Any]:
        return _decoded({key: _plain(value) for key, value in self.file.attrs.items()})

    @property
    def fingerprint(self) -> str:
        return _plain(self.file.attrs["fingerprint"])

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def __getitem__(self, name: str) -> h5py.Dataset:
        return self.file[name]

    def array(self, name: str) -> np.ndarray:
        return self.file[name][...]

    def strings(self, name: str) -> np.ndarray:
        """A string dataset as a numpy array of Python str."""
        return np.asarray(self.file[name].asstr()[...], dtype=object)

    def rows(self, name: str) -> int:
        return int(self.file[name].shape[0])

    def iter_rows(self, name: str, chunk_rows: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (offset, block) pairs of at most `chunk_rows` rows, so memory stays bounded."""
        dataset = self.file[name]
        for offset in range(start, dataset.shape[0], chunk_rows):
            yield offset, dataset[offset : offset + chunk_rows]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "H5Artifact":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(path: Path) -> dict[str, Any]:
    """Root attributes and every dataset's shape and dtype, for `ssl inspect`."""
    datasets: list[dict[str, Any]] = []
    with h5py.File(path, "r") as handle:

        def visit(name: str, item: Any) -> None:
            if isinstance(item, h5py.Dataset):
                datasets.append({"name": name, "shape": tuple(item.shape), "dtype": str(item.dtype)})

        handle.visititems(visit)
    return {"attrs": read_root_attrs(path), "datasets": datasets}


class RowWriter:
    """Writes `<out>.partial`, appends row blocks, and renames to `<out>` on `commit()`.

    `columns` maps a row dataset name to (per-row shape, dtype); strings use dtype `str`.
    Re-opening a `.partial` with the same fingerprint resumes after its `rows_done` rows.
    """

    def __init__(self, handle: h5py.File, out: Path):
        self.handle = handle
        self.out = out
        self.rows_done = int(handle.attrs.get("rows_done", 0))

    @classmethod
    def create(
        cls,
        out: Path,
        provenance: Provenance,
        columns: dict[str, tuple[tuple[int, ...], Any]],
        chunk_rows: int = 1024,
    ) -> "RowWriter":
        partial = partial_path(out)
        partial.parent.mkdir(parents=True, exist_ok=True)
        handle = h5py.File(partial, "w")
        for key, value in provenance.as_attrs().items():
            handle.attrs[key] = value
        handle.attrs["rows_done"] = 0
        handle.attrs["complete"] = False
        for name, (row_shape, dtype) in columns.items():
            h5_dtype = STRING if dtype is str else np.dtype(dtype)
            handle.create_dataset(
                name,
                shape=(0, *row_shape),
                maxshape=(None, *row_shape),
                dtype=h5_dtype,
                chunks=(max(1, min(chunk_rows, 1 << 16)), *row_shape),
            )
        handle.flush()
        return cls(handle, out)

    @classmethod
    def resume(cls, out: Path, fingerprint: str) -> "RowWriter | None":
        """Open `<out>.partial` for appending if it was written by the same fingerprint, else None."""
        partial = partial_path(out)
        if not partial.exists():
            return None
        try:
            handle = h5py.File(partial, "r+")
        except OSError:
            # A writer killed inside an HDF5 metadata write can leave the file unreadable; the
            # partial was never complete, so starting over loses nothing but time.
            partial.unlink()
            return None
        if _plain(handle.attrs.get("fingerprint")) != fingerprint:
            handle.close()
            partial.unlink()
            return None
        writer = cls(handle, out)
        for name in writer._row_datasets():
            handle[name].resize(writer.rows_done, axis=0)
        return writer

    def _row_datasets(self) -> list[str]:
        return [name for name, item in self.handle.items() if isinstance(item, h5py.Dataset) and item.maxshape[0] is None]

    def append(self, attrs: dict[str, Any] | None = None, **columns: np.ndarray) -> None:
        """Append the same number of rows to every row dataset, then mark them done.

        `attrs` (e.g. a reader's position in its source) are recorded in the same flush as
        `rows_done`, so a resumed writer never sees rows counted without the position that goes
        with them (which would make it read those rows again).
        """
        counts = {len(values) for values in columns.values()}
        if len(counts) != 1:
            raise ValueError(f"append needs equal row counts, got { {k: len(v) for k, v in columns.items()} }")
        count = counts.pop()
        expected = set(self._row_datasets())
        if set(columns) != expected:
            raise ValueError(f"append needs columns {sorted(expected)}, got {sorted(columns)}")
        start = self.rows_done
        for name, values in columns.items():
            dataset = self.handle[name]
            dataset.resize(start + count, axis=0)
            dataset[start : start + count] = values
        self.rows_done = start + count
        # rows_done is written last and flushed, so a kill never lets half a block count as done.
        self._write_attrs(attrs or {})
        self.handle.attrs["rows_done"] = self.rows_done
        self.handle.flush()

    def set_attrs(self, **attrs: Any) -> None:
        self._write_attrs(attrs)
        self.handle.flush()

    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, default=str)
            self.handle.attrs[key] = value

    def get_attr(self, key: str, default: Any = None) -> Any:
        value = self.handle.attrs.get(key, default)
        return _plain(value) if value is not None else default

    def write_array(self, name: str, values: np.ndarray) -> None:
        """A fixed (non-row) dataset such as centroids; replaced if it exists."""
        if name in self.handle:
            del self.handle[name]
        if values.dtype == object:
            self.handle.create_dataset(name, data=values.astype(str).astype(object), dtype=STRING)
        else:
            self.handle.create_dataset(name, data=values)

    def commit(self) -> Path:
        """Mark complete and rename `<out>.partial` to `<out>` (atomic; replaces an old `<out>`)."""
        self.handle.attrs["complete"] = True
        self.handle.attrs["rows_done"] = self.rows_done
        self.handle.close()
        os.replace(partial_path(self.out), self.out)
        return self.out

    def close(self) -> None:
        """Close without committing: the `.partial` stays for a later resume."""
        if self.handle.id.valid:
            self.handle.close()

    def discard(self) -> None:
        """Close and delete `<out>.partial`: for failures that a re-run would only repeat."""
        self.close()
        partial_path(self.out).unlink(missing_ok=True)


def write_arrays(out: Path, provenance: Provenance, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> Path:
    """Write a small artifact in one go (via `.partial` and rename)."""
    writer = RowWriter.create(out, provenance, columns={})
    for name, values in arrays.items():
        writer.write_array(name, values)
    writer.set_attrs(**attrs)
    # rows_done counts samples where the artifact has them, not the longest auxiliary array
    rows = len(arrays["sample_ids"]) if "sample_ids" in arrays else max((len(v) for v in arrays.values()), default=0)
    writer.rows_done = rows
    return writer.commit()
