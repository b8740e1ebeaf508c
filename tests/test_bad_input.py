"""Bad input: exit 2, one line `error: ...` naming the problem, no traceback, nothing written or changed.

Each test snapshots its working folder (paths, mtimes, bytes) before the command and checks it is
exactly the same afterwards: no `<out>`, no stray `<out>.partial`, no input touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from ssl_cli.models.registry import arch_names, get_arch

FM_ROOT = Path("/usr/share/datasets/fashion-mnist")
EXTRACT = ("--arch", "alexnet_lowres", "--layer", "conv2", "--workers", 0, "--device", "cpu", "--no-progress")


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2 and exactly one output line, `error: ...`, containing every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def run_refused(cli, snapshot, folder: Path, args, *fragments: str) -> str:
    before = snapshot(folder)
    line = assert_user_error(cli(*args), *fragments)
    assert snapshot(folder) == before, "a refused command wrote or changed files"
    return line


# --- --data ----------------------------------------------------------------------------------------


def test_missing_data_path(cli, snapshot, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", missing, "--out", tmp_path / "f.h5", *EXTRACT],
                str(missing), "does not exist")


def test_empty_folder(cli, snapshot, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", tmp_path / "empty", "--out", tmp_path / "f.h5", *EXTRACT],
                "no images under", "found nothing")


def test_folder_of_non_images(cli, snapshot, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello")
    (folder / "sub" / "table.csv").write_text("a,b\n1,2\n")
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", folder, "--out", tmp_path / "f.h5", *EXTRACT],
                "no images under", "2 other file(s)", ".png")


def test_pack_of_an_empty_folder(cli, snapshot, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run_refused(cli, snapshot, tmp_path, ["pack", "--data", tmp_path / "empty", "--out", tmp_path / "i.h5",
                                          "--no-progress"], "no images under")


@pytest.mark.parametrize("spec", ["imagenet:/data/train", "s3://bucket/images"])
def test_unknown_data_form_lists_the_accepted_forms(cli, snapshot, tmp_path: Path, spec: str) -> None:
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", spec, "--out", tmp_path / "f.h5", *EXTRACT],
                spec, "a folder of images", "fashion-mnist:DIR")


def test_a_file_that_is_not_an_image_store(cli, snapshot, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not images")
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", notes, "--out", tmp_path / "f.h5", *EXTRACT],
                "not an images .h5", "fashion-mnist:DIR")


def test_fashion_mnist_of_a_missing_directory(cli, snapshot, tmp_path: Path) -> None:
    missing = tmp_path / "fm"
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", f"fashion-mnist:{missing}", "--out", tmp_path / "f.h5",
                                          *EXTRACT], str(missing), "dataset-fashion-mnist")


@pytest.mark.skipif(not FM_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_unknown_split_is_named(cli, snapshot, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", f"fashion-mnist:{FM_ROOT}:valid",
                                          "--out", tmp_path / "f.h5", *EXTRACT], "'valid'", "train or test")


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_images_are_skipped_counted_and_named(cli, toy_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "toy"
    shutil.copytree(toy_dir, folder)
    good = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    class_dir = min(p for p in folder.iterdir() if p.is_dir())
    bad_png = class_dir / "zz_truncated.png"
    shutil.copy(next(class_dir.glob("*.png")), bad_png)
    _truncate(bad_png, 0.5)
    bad_jpeg = class_dir / "zz_truncated.jpg"
    with Image.open(next(class_dir.glob("*.png"))) as image:
        image.convert("RGB").resize((64, 64)).save(bad_jpeg, quality=95)
    _truncate(bad_jpeg, 0.6)
    bad_ids = sorted(p.relative_to(folder).as_posix() for p in (bad_png, bad_jpeg))

    out = tmp_path / "f.h5"
    result = cli("extract", "--data", folder, "--out", out, *EXTRACT)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "skipped 2 unreadable image(s)" in result.output
    assert "skipped" in result.output and bad_ids[0] in result.output
    with h5py.File(out, "r") as handle:
        assert handle.attrs["n_skipped"] == 2
        assert sorted(handle["skipped_ids"].asstr()[...]) == bad_ids
        ids = list(handle["sample_ids"].asstr()[...])
        assert ids == good
        assert handle["features"].shape[0] == len(good)
        assert np.isfinite(handle["features"][...]).all()
        assert (handle["targets"][...] >= 0).all()
    # Re-running is up to date (the skip is part of the result, not a failure to retry).
    again = cli("extract", "--data", folder, "--out", out, *EXTRACT)
    assert again.exit_code == 0 and "up to date" in again.output


# --- --features / --clusters ----------------------------------------------------------------------


def test_non_hdf5_features(cli, snapshot, tmp_path: Path) -> None:
    fake = tmp_path / "features.h5"
    fake.write_text("this is not HDF5")
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", fake, "--k", 3, "--out", tmp_path / "c.h5"],
                str(fake), "not an HDF5 file", "features")


def test_labels_given_as_features(cli, snapshot, labels_h5: Path, clusters_h5: Path, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", labels_h5, "--k", 3, "--out", tmp_path / "c.h5"],
                "holds labels, expected features", "ssl-cli/features@1.0", "ssl-cli/labels@1.0")
    run_refused(cli, snapshot, tmp_path, ["pseudolabel", "--clusters", clusters_h5, "--features", labels_h5,
                                          "--out", tmp_path / "l.h5"], "holds labels, expected features")


def test_clusters_given_as_features(cli, snapshot, clusters_h5: Path, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", clusters_h5, "--k", 3, "--out", tmp_path / "c.h5"],
                "holds clusters, expected features")


def test_features_given_as_clusters(cli, snapshot, features_h5: Path, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["pseudolabel", "--clusters", features_h5, "--features", features_h5,
                                          "--out", tmp_path / "l.h5"], "holds features, expected clusters")


def test_an_hdf5_file_that_is_no_artifact(cli, snapshot, tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as handle:
        handle["features"] = np.zeros((4, 3), np.float32)
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", plain, "--k", 2, "--out", tmp_path / "c.h5"],
                "not an ssl-cli artifact", "expected schema ssl-cli/features@1.0", "found None")


def test_features_artifact_missing_a_dataset(cli, snapshot, features_h5: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "features.h5"
    shutil.copy(features_h5, damaged)
    with h5py.File(damaged, "r+") as handle:
        del handle["sample_ids"]
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", damaged, "--k", 3, "--out", tmp_path / "c.h5"],
                "lacks the dataset(s) sample_ids", "found: features, targets")


def test_newer_major_schema(cli, snapshot, features_h5: Path, tmp_path: Path) -> None:
    newer = tmp_path / "features.h5"
    shutil.copy(features_h5, newer)
    with h5py.File(newer, "r+") as handle:
        handle.attrs["schema"] = "ssl-cli/features@2.0"
    line = run_refused(cli, snapshot, tmp_path, ["cluster", "--features", newer, "--k", 3, "--out", tmp_path / "c.h5"],
                       "ssl-cli/features@2.0", "ssl-cli/features@1.0", "upgrade ssl-cli")
    # what was found comes before what this version reads
    assert line.index("@2.0") < line.index("@1.0")


def test_newer_minor_schema_is_read(cli, features_h5: Path, tmp_path: Path) -> None:
    newer = tmp_path / "features.h5"
    shutil.copy(features_h5, newer)
    with h5py.File(newer, "r+") as handle:
        handle.attrs["schema"] = "ssl-cli/features@1.7"
    result = cli("cluster", "--features", newer, "--k", 3, "--pca-dim", 8, "--niter", 3, "--out", tmp_path / "c.h5",
                 "--no-progress")
    assert result.exit_code == 0, result.output


def test_features_of_another_layer_than_the_clusters(cli, snapshot, clusters_h5: Path, other_layer_features_h5: Path,
                                                     tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["pseudolabel", "--clusters", clusters_h5, "--features",
                                          other_layer_features_h5, "--out", tmp_path / "l.h5"],
                "64-d features", "192-d", "same layer")


def test_k_larger_than_the_number_of_rows(cli, snapshot, features_h5: Path, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", features_h5, "--k", 500, "--pca-dim", 8,
                                          "--out", tmp_path / "c.h5"], "--k 500", "96 feature rows", "--k 96")


def test_pca_dim_larger_than_the_features(cli, snapshot, features_h5: Path, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", features_h5, "--k", 3, "--pca-dim", 1000, "--no-progress",
                                          "--out", tmp_path / "c.h5"], "--pca-dim 1000", "192")


def _poison(features: Path, row: int, value: float) -> None:
    with h5py.File(features, "r+") as handle:
        block = handle["features"][row]
        block[3] = value
        handle["features"][row] = block


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("pca_dim", [16, 0])
def test_non_finite_features_refused_by_cluster(cli, snapshot, features_h5: Path, tmp_path: Path, value: float,
                                                pca_dim: int) -> None:
    bad = tmp_path / "features.h5"
    shutil.copy(features_h5, bad)
    _poison(bad, 17, value)
    with h5py.File(bad, "r") as handle:
        sample_id = handle["sample_ids"].asstr()[17]
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", bad, "--k", 3, "--pca-dim", pca_dim,
                                          "--out", tmp_path / "c.h5", "--no-progress"],
                "NaN or inf", "row 17", sample_id)


def test_non_finite_features_refused_by_pseudolabel(cli, snapshot, features_h5: Path, clusters_h5: Path,
                                                    tmp_path: Path) -> None:
    bad = tmp_path / "features.h5"
    shutil.copy(features_h5, bad)
    _poison(bad, 40, np.nan)
    run_refused(cli, snapshot, tmp_path, ["pseudolabel", "--clusters", clusters_h5, "--features", bad,
                                          "--out", tmp_path / "l.h5", "--no-progress"], "NaN or inf", "row 40")


def test_non_finite_features_written_with_the_row_writer(cli, snapshot, tmp_path: Path) -> None:
    """A features artifact built from scratch with RowWriter, one row NaN: refused like any other."""
    from ssl_cli.artifacts.h5 import RowWriter
    from ssl_cli.artifacts.schema import make_provenance

    out = tmp_path / "handmade.h5"
    provenance = make_provenance("features", "extract", {}, {"handmade": True}, [])
    writer = RowWriter.create(out, provenance, {"features": ((5,), np.float32), "sample_ids": ((), str),
                                                "targets": ((), np.int64)})
    rows = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    rows[29, 0] = np.nan
    writer.append(features=rows, sample_ids=np.array([f"s{i}" for i in range(30)], dtype=object),
                  targets=np.zeros(30, np.int64))
    writer.commit()
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", out, "--k", 2, "--pca-dim", 0,
                                          "--out", tmp_path / "c.h5", "--no-progress"], "NaN or inf", "row 29", "s29")


# --- outputs ----------------------------------------------------------------------------------------


def test_output_with_another_fingerprint_needs_force(cli, snapshot, features_h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    common = ("cluster", "--features", features_h5, "--pca-dim", 8, "--niter", 3, "--out", out, "--no-progress")
    assert cli(*common, "--k", 3).exit_code == 0
    run_refused(cli, snapshot, tmp_path, [*common, "--k", 4], str(out), "another fingerprint", "--force")
    with h5py.File(out, "r") as handle:
        assert handle["centroids"].shape[0] == 3
    forced = cli(*common, "--k", 4, "--force")
    assert forced.exit_code == 0, forced.output
    with h5py.File(out, "r") as handle:
        assert handle["centroids"].shape[0] == 4
    assert not out.with_name(out.name + ".partial").exists()


def test_output_that_is_not_an_artifact_is_not_overwritten(cli, snapshot, features_h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    out.write_text("my notes, not an artifact")
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", features_h5, "--k", 3, "--out", out],
                "no ssl-cli fingerprint", "--force")


def test_output_that_is_a_directory(cli, snapshot, features_h5: Path, tmp_path: Path) -> None:
    (tmp_path / "c.h5").mkdir()
    run_refused(cli, snapshot, tmp_path, ["cluster", "--features", features_h5, "--k", 3, "--out", tmp_path / "c.h5"],
                "is a directory")


# --- models ---------------------------------------------------------------------------------------


def test_unknown_arch_lists_the_valid_ones(cli, snapshot, toy_dir: Path, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", toy_dir, "--out", tmp_path / "f.h5",
                                          "--arch", "resnet19", "--workers", 0],
                "unknown arch 'resnet19'", *arch_names())


def test_unknown_layer_lists_the_valid_ones(cli, snapshot, toy_dir: Path, tmp_path: Path) -> None:
    layers = list(get_arch("resnet18_lowres").layers)
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", toy_dir, "--out", tmp_path / "f.h5",
                                          "--arch", "resnet18_lowres", "--layer", "conv5", "--workers", 0],
                "no layer 'conv5'", ", ".join(layers))


def test_both_or_neither_of_model_and_arch(cli, snapshot, toy_dir: Path, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", toy_dir, "--out", tmp_path / "f.h5"],
                "--model", "--arch")


def test_weights_that_are_not_a_state_dict(cli, snapshot, toy_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "w.pt"
    junk.write_bytes(b"\x00garbage")
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", toy_dir, "--out", tmp_path / "f.h5",
                                          "--weights", junk, *EXTRACT], str(junk), "not a torch state dict")


def test_image_size_below_the_arch_minimum(cli, snapshot, toy_dir: Path, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", toy_dir, "--out", tmp_path / "f.h5", "--arch", "alexnet",
                                          "--image-size", 32, "--workers", 0], "too small", "minimum 63")


@pytest.mark.parametrize("arch, fragments", [
    ("alexnet", ("--width", "alexnet has no channel multiplier", "drop --width")),
    ("resnet18_lowres", ("resnet18_lowres", "resnets take no width option")),
])
def test_width_for_an_arch_without_one(cli, snapshot, toy_dir: Path, tmp_path: Path, arch: str,
                                       fragments: tuple[str, ...]) -> None:
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", toy_dir, "--out", tmp_path / "f.h5", "--arch", arch,
                                          "--width", 0.5, "--workers", 0], *fragments)


def test_width_with_a_model_checkpoint(cli, snapshot, toy_dir: Path, tmp_path: Path) -> None:
    """A checkpoint records its width: a second one on the command line would contradict it."""
    (tmp_path / "student.pt").write_bytes(b"")  # exists: the contradiction is named before the file is read
    run_refused(cli, snapshot, tmp_path, ["extract", "--data", toy_dir, "--out", tmp_path / "f.h5",
                                          "--model", tmp_path / "student.pt", "--width", 0.5, "--workers", 0],
                "--model already records", "drop --weights/--image-size/--width")


# --- stages.yaml ----------------------------------------------------------------------------------

GOOD_STAGES = """\
stages:
  toy:
    cmd: toy-data
    params: {out: toy, n: 24, classes: 3}
  extract:
    cmd: extract
    params: {data: toy, arch: alexnet_lowres, layer: conv2, out: f.h5, workers: 0, device: cpu}
  cluster:
    cmd: cluster
    params: {features: f.h5, k: 3, pca_dim: 8, out: c.h5}
"""


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("stages:\n  toy: [unclosed\n", ("not valid YAML",)),
        ("- just\n- a list\n", ("valid dictionary",)),
        ("stages:\n  toy:\n    cmd: paint\n    params: {out: x}\n", ("stages.toy.cmd",)),
        ("stages:\n  toy:\n    cmd: toy-data\n    params: {n: 10}\n", ("stage toy has no params.out",)),
        ("stages:\n  toy:\n    cmd: toy-data\n    parameters: {out: x}\n", ("parameters", "unknown field")),
        (("stages:\n  a:\n    cmd: cluster\n    params: {features: b.h5, k: 2, out: a.h5}\n"
          "  b:\n    cmd: cluster\n    params: {features: a.h5, k: 2, out: b.h5}\n"), ("cycle",)),
        (GOOD_STAGES.replace("out: c.h5", "out: f.h5"), ("both write",)),
        # A bad value in a downstream stage must be caught before any upstream stage runs.
        (GOOD_STAGES.replace("k: 3", "k: many"), ("stage cluster", "k")),
        (GOOD_STAGES.replace("pca_dim: 8", "pca_dims: 8"), ("stage cluster", "pca", "dims: unknown field")),
    ],
    ids=["yaml-syntax", "not-a-mapping", "unknown-cmd", "no-out", "unknown-key", "cycle", "two-writers",
         "bad-downstream-value", "bad-downstream-key"],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_malformed_stages_file(cli, snapshot, tmp_path: Path, text: str, fragments: tuple[str, ...],
                               dry_run: bool) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(text)
    args = ["run", stages, *(["--dry-run"] if dry_run else [])]
    run_refused(cli, snapshot, tmp_path, args, *fragments)


def test_missing_stages_file(cli, snapshot, tmp_path: Path) -> None:
    run_refused(cli, snapshot, tmp_path, ["run", tmp_path / "stages.yaml"], "does not exist")


def test_unknown_stage_for_until_and_force(cli, snapshot, tmp_path: Path) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(GOOD_STAGES)
    run_refused(cli, snapshot, tmp_path, ["run", stages, "--until", "clustr"], "unknown stage(s) clustr",
                "toy, extract, cluster")
    run_refused(cli, snapshot, tmp_path, ["run", stages, "--force", "extrct"], "unknown stage(s) extrct")
