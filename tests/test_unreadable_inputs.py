"""Bad input that used to slip through: garbage checkpoints, unnamed skipped images in `ssl pack`, 16-bit and
EXIF-rotated images, and errors naming --data for another flag. Also `ssl inspect` of a .pt reading well."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from ssl_cli.config import PretextConfig
from ssl_cli.data.sources import FolderSource
from ssl_cli.stages import pretext
from test_bad_input import run_refused


def _garbage(kind: str, folder: Path, real: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "text-keyerror":
        path.write_text("hello world, this is a note\n")  # torch's safe loader: KeyError: 101
    elif kind == "text-pop":
        path.write_text("e some notes here\nand more\n")  # IndexError: pop from empty list
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
    elif kind == "truncated":
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory, toy_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("jigsawpp") / "jigsawpp.pt"
    pretext.run(PretextConfig(task="jigsawpp", arch="alexnet_lowres", width=0.25, data=str(toy_dir), out=out,
                              image_size=64, batch_size=16, epochs=1, workers=0, device="cpu", progress=False))
    return out


GARBAGE = ("text-keyerror", "text-pop", "random", "empty", "zip", "truncated")


@pytest.mark.parametrize("kind", GARBAGE)
def test_an_unreadable_checkpoint_is_one_sentence_for_every_command(cli, snapshot, toy_dir: Path, tmp_path: Path,
                                                                   real_checkpoint: Path, kind: str) -> None:
    bad = _garbage(kind, tmp_path, real_checkpoint)
    commands = [
        ["inspect", bad],
        ["extract", "--model", bad, "--data", toy_dir, "--out", tmp_path / "f.h5", "--workers", 0, "--no-progress"],
        ["finetune", "--model", bad, "--data", toy_dir, "--eval-data", toy_dir, "--out", tmp_path / "ft",
         "--workers", 0, "--no-progress"],
        ["self-train", "--teacher", bad, "--labelled", toy_dir, "--unlabelled", toy_dir, "--eval-data", toy_dir,
         "--out", tmp_path / "st", "--workers", 0, "--no-progress"],
    ]
    for args in commands:
        line = run_refused(cli, snapshot, tmp_path, args, str(bad), "not a loadable ssl-cli checkpoint")
        assert "KeyError" not in line and "IndexError" not in line, line


def test_inspect_of_a_checkpoint_is_short_and_shows_its_config_unescaped(cli, real_checkpoint: Path) -> None:
    result = cli("inspect", real_checkpoint)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) < 80, result.output
    assert '"task": "jigsawpp"' in result.output and '\\"' not in result.output
    assert "701 x 9 int64 [[" in result.output  # the permutation set, summarised


def test_pack_names_the_images_it_skipped(cli, toy_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "toy"
    shutil.copytree(toy_dir, folder)
    class_dir = min(p for p in folder.iterdir() if p.is_dir())
    broken = class_dir / "zz_broken.png"
    data = next(class_dir.glob("*.png")).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "images.h5"
    result = cli("pack", "--data", folder, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    bad_id = broken.relative_to(folder).as_posix()
    assert bad_id in result.output and "skipped_ids" in result.output
    with h5py.File(out, "r") as handle:
        assert handle.attrs["n_skipped"] == 1
        assert list(handle["skipped_ids"].asstr()[...]) == [bad_id]
        assert bad_id not in list(handle["sample_ids"].asstr()[...])


def test_a_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as image:
        assert image.mode.startswith("I")  # stored as 16-bit grey
    pixels = np.asarray(FolderSource(tmp_path).load(0)).astype(np.int64)
    assert pixels.shape == (32, 32, 3)
    assert abs(pixels.mean() - 127.5) < 2 and (pixels == 255).mean() < 0.01
    np.testing.assert_allclose(pixels[..., 0], np.rint(ramp / 257.0), atol=1)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A 40x20 JPEG (left half black, right half white) tagged "rotate 90 clockwise" (orientation 6) is shown
    20 wide and 40 high, white at the bottom."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    loaded = np.asarray(FolderSource(tmp_path).load(0)).mean(axis=(1, 2))
    assert loaded.shape == (40,)
    assert loaded[:15].max() < 30 and loaded[-15:].min() > 225


@pytest.mark.parametrize("empty_flag", ["--unlabelled", "--labelled", "--eval-data"])
def test_self_train_names_the_flag_of_an_empty_folder(cli, snapshot, toy_dir: Path, tmp_path: Path,
                                                      empty_flag: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    flags = {"--labelled": toy_dir, "--unlabelled": toy_dir, "--eval-data": toy_dir} | {empty_flag: empty}
    args = ["self-train", *[item for pair in flags.items() for item in pair], "--arch", "alexnet_lowres",
            "--out", tmp_path / "st", "--workers", 0, "--no-progress"]
    line = run_refused(cli, snapshot, tmp_path, args, str(empty), empty_flag, "no images under")
    assert "--data" not in line, line
