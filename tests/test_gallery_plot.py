"""`ssl gallery` and `ssl plot` through the CLI: picture sizes follow the request, pictures are not
blank, nothing is overwritten without --force, bad input is one line and exit 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from ssl_cli.artifacts.h5 import H5Artifact, write_arrays
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.viz.curves import curves_size
from ssl_cli.viz.gallery import gallery_size

N, CLASSES = 40, 4
QUIET = ("--workers", 0, "--device", "cpu", "--no-progress")


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2 and exactly one output line, `error: ...`, containing every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_picture(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The PNG has about `size` (width, height) pixels and is not blank."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    assert abs(width - size[0]) <= 2 and abs(height - size[1]) <= 2, (width, height, size)
    assert pixels.std() > 20, "the picture is (nearly) blank"
    assert not path.with_name(path.name + ".partial").exists()
    return pixels


@pytest.fixture(scope="module")
def chain(tmp_path_factory, cli) -> dict[str, Path]:
    """Toy images -> untrained alexnet_lowres features -> clusters -> pseudo-labels, all via the CLI,
    plus a labels.h5 shaped like a self-train round's (labels, confidence, selected; no distance)."""
    root = tmp_path_factory.mktemp("gallery")
    paths = {name: root / f"{name}.h5" for name in ("features", "clusters", "labels", "selftrain")}
    paths["toy"] = root / "toy"
    steps = [
        ("toy-data", paths["toy"], "--n", N, "--classes", CLASSES, "--size", 32),
        ("extract", "--data", paths["toy"], "--arch", "alexnet_lowres", "--layer", "conv2",
         "--out", paths["features"], *QUIET),
        ("cluster", "--features", paths["features"], "--k", CLASSES, "--pca-dim", 8, "--niter", 5, "--out",
         paths["clusters"], "--no-progress"),
        ("pseudolabel", "--clusters", paths["clusters"], "--features", paths["features"],
         "--out", paths["labels"], "--no-progress"),
    ]
    for step in steps:
        result = cli(*step)
        assert result.exit_code == 0, result.output
    with H5Artifact(paths["labels"], "labels") as labels:
        ids, targets = labels.strings("sample_ids"), labels.array("targets")
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, len(ids)).astype(np.float32)
    provenance = make_provenance("labels", "self-train", {"threshold": 0.3}, {"threshold": 0.3}, [])
    write_arrays(paths["selftrain"], provenance,
                 {"sample_ids": ids, "labels": targets.copy(), "confidence": confidence, "targets": targets,
                  "selected": np.flatnonzero(confidence > 0.5)}, attrs={"k": CLASSES})
    return paths


# --- gallery ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,columns,thumb", [(2, 5, 48), (4, 3, 64)])
def test_gallery_of_clusters_has_the_requested_grid(cli, chain, tmp_path: Path, rows: int, columns: int,
                                                    thumb: int) -> None:
    out = tmp_path / "gallery.png"
    result = cli("gallery", chain["clusters"], "--data", chain["toy"], "--out", out, "--clusters", rows,
                 "--per-cluster", columns, "--thumb-size", thumb)
    assert result.exit_code == 0, result.output
    assert_picture(out, gallery_size(rows, columns, thumb))
    assert "distance" in result.output  # clusters rank by distance to the centroid


def test_gallery_of_pseudolabels_by_purity_and_distance(cli, chain, tmp_path: Path) -> None:
    for order, rank in (("purest", "distance"), ("mixed", "confidence")):
        out = tmp_path / f"{order}.png"
        result = cli("gallery", chain["labels"], "--data", chain["toy"], "--out", out, "--order", order,
                     "--rank", rank, "--clusters", 3, "--per-cluster", 4)
        assert result.exit_code == 0, result.output
        assert_picture(out, gallery_size(3, 4, 64))


def test_gallery_orders_rows_by_purity(chain) -> None:
    from ssl_cli.stages.gallery import group_stats, order_groups

    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    targets = np.array([5, 5, 5, 1, 2, 0, 0, 0, 1, -1])
    stats = group_stats(groups, targets)
    assert [s.size for s in stats] == [3, 2, 4, 1]
    assert [s.majority for s in stats] == [5, 1, 0, None]
    assert [s.group for s in order_groups(stats, "largest")] == [2, 0, 1, 3]
    assert [s.group for s in order_groups(stats, "purest")] == [0, 2, 1, 3]
    assert [s.group for s in order_groups(stats, "mixed")] == [1, 2, 0, 3]


def test_gallery_of_self_train_labels(cli, chain, tmp_path: Path) -> None:
    out = tmp_path / "selftrain.png"
    result = cli("gallery", chain["selftrain"], "--data", chain["toy"], "--out", out, "--per-cluster", 4)
    assert result.exit_code == 0, result.output
    assert "classs" not in result.output and "classes" in result.output  # rows are a teacher's classes
    assert_picture(out, gallery_size(CLASSES, 4, 64))
    assert_user_error(cli("gallery", chain["selftrain"], "--data", chain["toy"], "--out", tmp_path / "d.png",
                          "--rank", "distance"), "no distance", "--rank confidence")


def test_gallery_never_overwrites_without_force(cli, chain, tmp_path: Path) -> None:
    out = tmp_path / "gallery.png"
    args = ("gallery", chain["clusters"], "--data", chain["toy"], "--out", out, "--per-cluster", 2)
    assert cli(*args).exit_code == 0
    before = out.read_bytes()
    assert_user_error(cli(*args, "--clusters", 1), str(out), "exists", "--force")
    assert out.read_bytes() == before
    assert cli(*args, "--clusters", 1, "--force").exit_code == 0
    assert_picture(out, gallery_size(1, 2, 64))


def test_gallery_without_targets_has_no_purity(cli, chain, tmp_path: Path) -> None:
    clusters = tmp_path / "clusters.h5"
    shutil.copy2(chain["clusters"], clusters)
    with h5py.File(clusters, "r+") as handle:
        handle["targets"][...] = -1
    assert_user_error(cli("gallery", clusters, "--data", chain["toy"], "--out", tmp_path / "p.png", "--order",
                          "purest"), "needs targets", "--order largest")
    result = cli("gallery", clusters, "--data", chain["toy"], "--out", tmp_path / "l.png", "--clusters", 2)
    assert result.exit_code == 0, result.output
    assert_picture(tmp_path / "l.png", gallery_size(2, 8, 64))


def test_gallery_names_sample_ids_missing_from_data(cli, chain, tmp_path: Path) -> None:
    subset = tmp_path / "subset"
    first_class = min(chain["toy"].iterdir())
    shutil.copytree(first_class, subset / first_class.name)
    line = assert_user_error(cli("gallery", chain["clusters"], "--data", subset, "--out", tmp_path / "g.png"),
                             "sample ids", "not in --data", str(subset))
    missing = sorted(path.relative_to(chain["toy"]).as_posix() for path in chain["toy"].rglob("*.png")
                     if path.parent != first_class)
    assert any(sample_id in line for sample_id in missing)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("args,fragments", [
    (("--order", "random"), ("--order 'random'", "largest, purest, mixed")),
    (("--rank", "confidence"), ("no confidence", "--rank distance")),
    (("--per-cluster", 0), ("--per-cluster", "at least 1")),
    (("--thumb-size", 4), ("--thumb-size 4", "16 to 512")),
])
def test_gallery_bad_options(cli, chain, tmp_path: Path, args, fragments) -> None:
    result = cli("gallery", chain["clusters"], "--data", chain["toy"], "--out", tmp_path / "g.png", *args)
    assert_user_error(result, *fragments)
    assert not list(tmp_path.iterdir())


def test_gallery_refuses_other_files(cli, chain, tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    assert_user_error(cli("gallery", chain["features"], "--data", chain["toy"], "--out", out),
                      "holds features", "clusters.h5")
    assert_user_error(cli("gallery", tmp_path / "none.h5", "--data", chain["toy"], "--out", out),
                      "does not exist")
    assert_user_error(cli("gallery", chain["clusters"], "--data", chain["toy"], "--out", tmp_path / "g.jpg"),
                      "must end in .png")
    assert_user_error(cli("gallery", chain["clusters"], "--out", out), "--data")


# --- plot ------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def hand_written_runs(folder: Path) -> list[Path]:
    runs = []
    for name, scale in (("rotation", 1.0), ("jigsaw", 0.6)):
        rows = [{"epoch": e, "loss": scale * 2 / e, "accuracy": None if name == "jigsaw" else e / 5,
                 "lr": 0.01 * (6 - e) / 5, "images_per_second": 100.0 + e, "seconds": 1.5, "nmi": e / 10}
                for e in range(1, 6)]
        runs.append(write_jsonl(folder / f"{name}.metrics.jsonl", rows))
    return runs


def test_plot_every_numeric_metric(cli, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = cli("plot", *hand_written_runs(tmp_path), "--out", out)
    assert result.exit_code == 0, result.output
    assert "loss, accuracy, lr, images_per_second, seconds, nmi" in result.output
    assert "rotation, jigsaw" in result.output
    assert_picture(out, curves_size(6))


def test_plot_chosen_metrics_and_labels(cli, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = cli("plot", *hand_written_runs(tmp_path), "--out", out, "--metrics", "loss,accuracy",
                 "--label", "first", "--label", "second")
    assert result.exit_code == 0, result.output
    assert "first, second" in result.output
    assert_picture(out, curves_size(2))
    assert_user_error(cli("plot", *hand_written_runs(tmp_path), "--out", out), str(out), "exists", "--force")
    result = cli("plot", *hand_written_runs(tmp_path), "--out", out, "--metrics", "nmi", "--force")
    assert result.exit_code == 0, result.output
    assert_picture(out, curves_size(1))


def test_plot_of_a_real_training_run(cli, chain, tmp_path: Path) -> None:
    model = tmp_path / "rotation.pt"
    result = cli("pretext", "--task", "rotation", "--arch", "alexnet_lowres", "--width", 0.25,
                 "--data", chain["toy"], "--epochs", 1, "--batch-size", 20, "--out", model, *QUIET)
    assert result.exit_code == 0, result.output
    out = tmp_path / "curves.png"
    result = cli("plot", tmp_path / "rotation.metrics.jsonl", "--out", out, "--metrics", "loss,accuracy,lr")
    assert result.exit_code == 0, result.output
    assert_picture(out, curves_size(3))


def test_plot_bad_input(cli, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    good = hand_written_runs(tmp_path)[0]
    empty = tmp_path / "empty.metrics.jsonl"
    empty.write_text("\n")
    words = write_jsonl(tmp_path / "words.metrics.jsonl", [{"epoch": 1, "note": "warm-up", "ok": True}])
    broken = tmp_path / "broken.metrics.jsonl"
    broken.write_text('{"epoch": 1, "loss": 2.0}\n{"epoch": 2, "loss"\n')
    listed = write_jsonl(tmp_path / "listed.metrics.jsonl", [[1, 2.0]])
    cases = [
        ((tmp_path / "missing.metrics.jsonl",), ("missing.metrics.jsonl", "does not exist")),
        ((empty,), (str(empty), "is empty")),
        ((words,), (str(words), "no numeric metric", "note")),
        ((broken,), (f"{broken}:2", "not JSON")),
        ((listed,), (f"{listed}:1", "not an object")),
        ((good, "--metrics", "loss,top5"), ("--metrics top5", "loss, accuracy")),
        ((good, "--label", "a", "--label", "b"), ("2 --label", "1 file")),
        ((good, "--out", tmp_path / "curves.gif"), ("must end in .png",)),
    ]
    for args, fragments in cases:
        out_args = () if "--out" in args else ("--out", out)
        assert_user_error(cli("plot", *args, *out_args), *fragments)
    assert not out.exists()


# --- matplotlib is optional ---------------------------------------------------------------------------


def test_missing_matplotlib_names_the_install_command(cli, chain, tmp_path: Path, monkeypatch) -> None:
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    run = hand_written_runs(tmp_path)[0]
    assert_user_error(cli("plot", run, "--out", tmp_path / "curves.png"),
                      "matplotlib", "pip install 'ssl-cli[viz]'")
    assert_user_error(cli("gallery", chain["clusters"], "--data", chain["toy"], "--out", tmp_path / "g.png"),
                      "matplotlib", "pip install matplotlib")
    assert not list(tmp_path.glob("*.png"))
