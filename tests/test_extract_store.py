"""ssl extract from a packed store: row blocks converted on the batch, the same features as image by image."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from interrupts import dies_on_call
from PIL import Image

from ssl_cli.config import PackConfig
from ssl_cli.data.transforms import eval_batch, eval_transform
from ssl_cli.stages import extract, pack


@pytest.fixture(scope="module")
def toy_store(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "toy.h5"
    pack.run(PackConfig(data=str(toy_dir), out=out, progress=False))
    return out


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("per_image", [False, True])
def test_eval_batch_gives_the_per_image_transform_bytes(channels: int, per_image: bool) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 16, 16, channels), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = eval_transform(16, mean, std, per_image)
    want = torch.stack([transform(Image.fromarray(row[..., 0] if channels == 1 else row).convert("RGB"))
                        for row in pixels])
    got = eval_batch(torch.from_numpy(pixels), mean, std, per_image)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 16, 16)
    assert torch.equal(got, want)


def test_store_extract_reads_row_blocks_and_equals_the_per_image_path(toy_store, extract_cfg, tmp_path,
                                                                      monkeypatch) -> None:
    cfg = extract_cfg(toy_store, tmp_path / "rows.h5", batch_size=16)
    prepared = extract.prepare(cfg)
    assert extract.reads_rows(prepared.source, prepared.network)
    fast = extract.run(cfg).out
    monkeypatch.setattr(extract, "reads_rows", lambda source, network: False)
    slow = extract.run(extract_cfg(toy_store, tmp_path / "images.h5", batch_size=16)).out
    with h5py.File(fast, "r") as got, h5py.File(slow, "r") as want:
        assert got["features"].shape == want["features"].shape == (96, 192)
        assert got["features"][...].tobytes() == want["features"][...].tobytes()
        np.testing.assert_array_equal(got["sample_ids"][...], want["sample_ids"][...])
        np.testing.assert_array_equal(got["targets"][...], want["targets"][...])


def test_store_extract_killed_after_a_block_resumes_to_the_same_bytes(toy_store, extract_cfg, tmp_path,
                                                                      monkeypatch) -> None:
    whole = extract.run(extract_cfg(toy_store, tmp_path / "whole.h5", batch_size=4)).out
    cfg = extract_cfg(toy_store, tmp_path / "f.h5", batch_size=4)
    real_flush = extract.flush
    monkeypatch.setattr(extract, "flush", dies_on_call(real_flush, 2))  # killed after the first block
    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg)
    with h5py.File(extract.partial_path(cfg.out), "r") as handle:
        assert handle.attrs["rows_done"] == 4 * extract.FLUSH_BATCHES
    monkeypatch.setattr(extract, "flush", real_flush)
    assert extract.run(cfg).status == "resumed"
    with h5py.File(cfg.out, "r") as got, h5py.File(whole, "r") as want:
        assert got["features"][...].tobytes() == want["features"][...].tobytes()


def test_a_store_at_another_size_goes_image_by_image(toy_store, extract_cfg) -> None:
    prepared = extract.prepare(extract_cfg(toy_store, Path("unused.h5"), image_size=40))
    assert prepared.network.input_size == 40
    assert not extract.reads_rows(prepared.source, prepared.network)
