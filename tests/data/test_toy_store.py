"""`ssl toy-data OUT.h5`: the toy corpus as one HDF5 image store, equal to the folder, resumable, usable as --data."""

from __future__ import annotations

import multiprocessing
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from ssl_cli.artifacts.h5 import partial_path
from ssl_cli.config import ToyDataConfig
from ssl_cli.data import toy
from ssl_cli.data.sources import open_source
from ssl_cli.data.toy import class_names, draw_toy_image, toy_labels
from ssl_cli.errors import UserError
from ssl_cli.report import SilentReporter
from ssl_cli.stages import extract, toy_data


class Interrupted(BaseException):
    """Stands in for a kill: a BaseException, so the stage's cleanup runs as for Ctrl-C."""


class StopAfter(SilentReporter):
    """A reporter whose progress callback raises once `blocks` blocks have been written."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = blocks

    @contextmanager
    def progress(self, description, total, unit="img", completed=0):
        calls = {"n": 0}

        def advance(count: int = 1) -> None:
            calls["n"] += 1
            if calls["n"] == self.blocks:
                raise Interrupted

        yield advance


@pytest.fixture
def small_blocks(monkeypatch) -> int:
    """Blocks of 8 rows, so a toy store of a few dozen images is written in several appends."""
    monkeypatch.setattr(toy, "_MAX_BLOCK_ROWS", 8)
    return 8


def _store(out: Path, **values) -> ToyDataConfig:
    return ToyDataConfig(out=out, **{"n": 40, "classes": 4, "size": 16, "seed": 3, "workers": 1, **values})


def _contents(path: Path) -> dict:
    with h5py.File(path, "r") as handle:
        return {"images": handle["images"][...].tobytes(), "sample_ids": list(handle["sample_ids"].asstr()[...]),
                "targets": handle["targets"][...].tolist(), "classes": handle.attrs["classes"],
                "fingerprint": handle.attrs["fingerprint"], "rows_done": int(handle.attrs["rows_done"]),
                "chunks": handle["images"].chunks}


def test_store_rows_are_the_folder_images(tmp_path: Path) -> None:
    store = tmp_path / "toy.h5"
    result = toy_data.run(_store(store))
    assert result.status == "written" and not partial_path(store).exists()
    toy_data.run(_store(tmp_path / "folder"))

    labels = toy_labels(40, 4, seed=3)
    names = class_names(4)
    rows, folder = open_source(str(store)), open_source(str(tmp_path / "folder"))
    assert rows.classes == folder.classes == names
    # Row i is image i, named by its path in the folder.
    assert rows.sample_ids == [f"{names[y]}/{i:06d}.png" for i, y in enumerate(labels)]
    assert sorted(rows.sample_ids) == sorted(folder.sample_ids)
    assert np.array_equal(rows.targets, labels)
    position = {sample_id: i for i, sample_id in enumerate(folder.sample_ids)}
    for i, sample_id in enumerate(rows.sample_ids):
        pixels = np.asarray(rows.load(i))
        assert pixels.tobytes() == draw_toy_image(i, int(labels[i]), 4, 16, seed=3).tobytes()
        assert pixels.tobytes() == np.asarray(folder.load(position[sample_id])).tobytes()
        assert folder.targets[position[sample_id]] == labels[i]
    assert _contents(store)["chunks"] == (64, 16, 16, 3)


def test_store_from_a_pool_equals_the_in_process_one(tmp_path: Path, small_blocks: int) -> None:
    toy_data.run(_store(tmp_path / "one.h5"))
    toy_data.run(_store(tmp_path / "pool.h5", workers=2))
    one, pool = _contents(tmp_path / "one.h5"), _contents(tmp_path / "pool.h5")
    assert pool == one  # the worker count is not part of the fingerprint either


def test_interrupted_store_resumes_to_identical_rows(tmp_path: Path, small_blocks: int) -> None:
    reference = tmp_path / "reference.h5"
    toy_data.run(_store(reference, n=64))
    out = tmp_path / "toy.h5"

    # Stopped in the middle of a pool's work: its processes are stopped with it.
    with pytest.raises(Interrupted):
        toy_data.run(_store(out, n=64, workers=2), reporter=StopAfter(blocks=3))
    assert not out.exists() and multiprocessing.active_children() == []
    with h5py.File(partial_path(out), "r") as handle:
        assert int(handle.attrs["rows_done"]) == 3 * small_blocks

    # Resumed in-process, stopped again, then finished: the rows are those of the uninterrupted run.
    with pytest.raises(Interrupted):
        toy_data.run(_store(out, n=64), reporter=StopAfter(blocks=2))
    with h5py.File(partial_path(out), "r") as handle:
        assert int(handle.attrs["rows_done"]) == 5 * small_blocks
    result = toy_data.run(_store(out, n=64))
    assert result.status == "resumed" and not partial_path(out).exists()
    assert _contents(out) == _contents(reference)


def test_finished_store_is_up_to_date_and_other_settings_need_force(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    toy_data.run(_store(out))
    before = out.stat().st_mtime_ns
    reporter = SilentReporter()
    assert toy_data.run(_store(out, workers=2), reporter=reporter).status == "up to date"
    assert reporter.messages == [f"{out} is up to date; skipped"] and out.stat().st_mtime_ns == before

    with pytest.raises(UserError, match="pass --force"):
        toy_data.run(_store(out, seed=4))
    assert _contents(out)["fingerprint"] == toy_data.provenance(_store(out)).fingerprint
    assert toy_data.run(_store(out, seed=4), force=True).status == "written"
    assert _contents(out)["fingerprint"] == toy_data.provenance(_store(out, seed=4)).fingerprint


def test_format_follows_the_suffix_unless_given(tmp_path: Path) -> None:
    assert _store(tmp_path / "a.h5").store and _store(tmp_path / "a.HDF5").store
    assert not _store(tmp_path / "a").store
    assert not _store(tmp_path / "a.h5", format="folder").store
    assert _store(tmp_path / "a.images", format="h5").store


def test_store_is_data_for_extract(tmp_path: Path, extract_cfg) -> None:
    store, folder = tmp_path / "toy.h5", tmp_path / "toy"
    toy_data.run(_store(store, n=64, size=32))
    toy_data.run(_store(folder, n=64, size=32))
    extract.run(extract_cfg(store, tmp_path / "from_store.h5"))
    extract.run(extract_cfg(folder, tmp_path / "from_folder.h5"))

    with h5py.File(tmp_path / "from_store.h5", "r") as a, h5py.File(tmp_path / "from_folder.h5", "r") as b:
        ids_a, ids_b = list(a["sample_ids"].asstr()[...]), list(b["sample_ids"].asstr()[...])
        assert sorted(ids_a) == sorted(ids_b) and len(ids_a) == 64
        order = [ids_b.index(sample_id) for sample_id in ids_a]
        assert np.array_equal(a["targets"][...], b["targets"][...][order])
        np.testing.assert_allclose(a["features"][...], b["features"][...][order], rtol=1e-5, atol=1e-6)


def test_cli_writes_a_store_and_refuses_other_settings(cli, tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    first = cli("toy-data", str(out), "--n", "12", "--classes", "3", "--size", "16", "--workers", "1")
    assert first.exit_code == 0, first.output
    assert open_source(str(out)).sample_ids[0].startswith("c")
    again = cli("toy-data", str(out), "--n", "13", "--classes", "3", "--size", "16")
    assert again.exit_code == 2
    assert again.output.count("\n") == 1 and again.output.startswith("error: ") and "--force" in again.output
