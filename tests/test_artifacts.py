"""Artifacts: schema strings, fingerprints, the `.partial` row writer with resume, the output policy,
and checkpoints that load with `weights_only=True` and never unpickle arbitrary objects."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ssl_cli import CODE_MAJOR
from ssl_cli.artifacts.checkpoint import describe_checkpoint, load_checkpoint, save_checkpoint
from ssl_cli.artifacts.h5 import H5Artifact, RowWriter, partial_path, write_arrays
from ssl_cli.artifacts.outputs import OutputState, plan_output
from ssl_cli.artifacts.schema import (
    SCHEMA_VERSIONS,
    Provenance,
    check_schema,
    fingerprint,
    make_provenance,
    parse_schema,
    schema_string,
)
from ssl_cli.config import ClusterConfig, PseudolabelConfig
from ssl_cli.errors import UserError
from ssl_cli.stages import cluster, extract, pseudolabel

COLUMNS = {"features": ((3,), np.float32), "sample_ids": ((), str), "targets": ((), np.int64)}


def _provenance(tag: str = "a", kind: str = "features") -> Provenance:
    return make_provenance(kind, "test", {"tag": tag}, {"tag": tag}, [{"path": "in", "fingerprint": "f0"}])


def _rows(start: int, count: int) -> dict[str, np.ndarray]:
    index = np.arange(start, start + count)
    return {"features": np.stack([index, index * 2, index * 3], axis=1).astype(np.float32),
            "sample_ids": np.array([f"id{i:04d}" for i in index], dtype=object),
            "targets": (index % 5).astype(np.int64)}


# --- schema ---------------------------------------------------------------------------------------


def test_schema_strings_round_trip() -> None:
    for kind in ("features", "clusters", "labels", "images", "checkpoint"):
        text = schema_string(kind)
        assert text.startswith("ssl-cli/") and "@" in text
        assert parse_schema(text) == (kind, *SCHEMA_VERSIONS[kind])
    assert parse_schema("ssl-cli/features@12.3") == ("features", 12, 3)


@pytest.mark.parametrize("text", ["", "features@1.0", "ssl-cli/features", "ssl-cli/features@one.0",
                                  "ssl-cli/features@1", "other/features@1.0", None, 7])
def test_parse_schema_refuses_what_is_not_a_schema(text) -> None:
    assert parse_schema(text) is None


def test_check_schema_accepts_same_major_any_minor(tmp_path: Path) -> None:
    check_schema("ssl-cli/features@1.0", "features", tmp_path / "f.h5")
    check_schema("ssl-cli/features@1.9", "features", tmp_path / "f.h5")


def test_check_schema_kind_mismatch_says_expected_and_found(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        check_schema("ssl-cli/labels@1.0", "features", tmp_path / "x.h5")
    message = str(error.value)
    assert "holds labels, expected features" in message
    assert "ssl-cli/features@1.0" in message and "ssl-cli/labels@1.0" in message and "x.h5" in message


def test_check_schema_newer_major(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        check_schema("ssl-cli/clusters@2.0", "clusters", tmp_path / "c.h5")
    message = str(error.value)
    assert "ssl-cli/clusters@2.0" in message and "ssl-cli/clusters@1.1" in message and "upgrade" in message


def test_check_schema_older_major_asks_to_recompute(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recompute"):
        check_schema("ssl-cli/clusters@0.3", "clusters", tmp_path / "c.h5")


@pytest.mark.parametrize("found", [None, "hello", "ssl-cli/features"])
def test_check_schema_not_an_artifact(tmp_path: Path, found) -> None:
    with pytest.raises(UserError, match="not an ssl-cli artifact.*expected schema ssl-cli/features@1.0"):
        check_schema(found, "features", tmp_path / "f.h5")


def test_h5_artifact_readers_check_the_schema(features_h5: Path, labels_h5: Path, tmp_path: Path) -> None:
    with H5Artifact(features_h5, "features", required=("features", "sample_ids")) as artifact:
        assert artifact.kind == "features"
        assert artifact.attrs["schema"] == "ssl-cli/features@1.0"
        assert isinstance(artifact.attrs["config"], dict)
    with pytest.raises(UserError, match="holds labels, expected features"):
        H5Artifact(labels_h5, "features")
    with pytest.raises(UserError, match="does not exist"):
        H5Artifact(tmp_path / "none.h5", "features")
    damaged = tmp_path / "damaged.h5"
    shutil.copy(features_h5, damaged)
    with h5py.File(damaged, "r+") as handle:
        del handle["sample_ids"]
    with pytest.raises(UserError, match="lacks the dataset.*sample_ids"):
        H5Artifact(damaged, "features", required=("features", "sample_ids"))


def test_every_artifact_records_its_provenance(features_h5: Path, clusters_h5: Path, labels_h5: Path) -> None:
    for path, kind in ((features_h5, "features"), (clusters_h5, "clusters"), (labels_h5, "labels")):
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
        for key in ("schema", "fingerprint", "config", "inputs", "code_version", "created"):
            assert key in attrs, (kind, key)
        assert attrs["schema"] == schema_string(kind)
        assert len(attrs["fingerprint"]) == 64
        assert isinstance(json.loads(attrs["config"]), dict)
        inputs = json.loads(attrs["inputs"])
        assert inputs and all({"path", "fingerprint"} <= set(item) for item in inputs)
        assert bool(attrs["complete"])
    # Each stage's inputs carry the fingerprints of the artifacts it read.
    with h5py.File(features_h5, "r") as f, h5py.File(clusters_h5, "r") as c, h5py.File(labels_h5, "r") as lab:
        assert json.loads(c.attrs["inputs"])[0]["fingerprint"] == f.attrs["fingerprint"]
        assert [item["fingerprint"] for item in json.loads(lab.attrs["inputs"])] == \
            [c.attrs["fingerprint"], f.attrs["fingerprint"]]


# --- fingerprints ---------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_covers_stage_config_inputs_and_code_major() -> None:
    base = fingerprint("cluster", {"k": 3, "seed": 0}, ["abc"])
    assert base == fingerprint("cluster", {"seed": 0, "k": 3}, ["abc"])  # key order does not matter
    assert len(base) == 64 and int(base, 16) >= 0
    assert base != fingerprint("extract", {"k": 3, "seed": 0}, ["abc"])
    assert base != fingerprint("cluster", {"k": 4, "seed": 0}, ["abc"])
    assert base != fingerprint("cluster", {"k": 3, "seed": 0}, ["abd"])
    assert base != fingerprint("cluster", {"k": 3, "seed": 0}, ["abc", "def"])


def test_fingerprint_covers_the_code_major(monkeypatch) -> None:
    from ssl_cli.artifacts import schema

    before = fingerprint("cluster", {"k": 3}, [])
    monkeypatch.setattr(schema, "CODE_MAJOR", CODE_MAJOR + 1)
    assert fingerprint("cluster", {"k": 3}, []) != before


def test_extract_fingerprint(toy_dir: Path, extract_cfg, tmp_path: Path) -> None:
    def print_of(**overrides) -> str:
        values = {"out": tmp_path / "f.h5"} | overrides
        return extract.provenance(extract_cfg(values.pop("data", toy_dir), values.pop("out"), **values)).fingerprint

    base = print_of()
    assert print_of() == base
    # display-only options: where it runs and how fast, not what it computes
    for display in ({"workers": 3}, {"device": "auto"}, {"progress": True}, {"batch_size": 7},
                    {"out": tmp_path / "elsewhere.h5"}, {"force": True}):
        assert print_of(**display) == base, display
    # settings that change the result
    for change in ({"layer": "conv3"}, {"pool": "max"}, {"pool_size": 2}, {"seed": 1}, {"dtype": "float16"},
                   {"image_size": 40}, {"arch": "resnet18_lowres", "layer": "layer1"}, {"width": 0.5}):
        assert print_of(**change) != base, change
    # --width unset leaves the fingerprint as it was before the option existed
    assert "width" not in extract_cfg(toy_dir, tmp_path / "f.h5").result_config()
    # the default layer resolved is the same as naming it
    from ssl_cli.models.registry import get_arch

    default_layer = get_arch("alexnet_lowres").feature_layer
    assert print_of(layer=None) == print_of(layer=default_layer)


def test_extract_fingerprint_follows_the_images(toy_dir: Path, extract_cfg, tmp_path: Path) -> None:
    copy = tmp_path / "toy"
    shutil.copytree(toy_dir, copy)
    before = extract.provenance(extract_cfg(copy, tmp_path / "f.h5")).fingerprint
    assert extract.provenance(extract_cfg(copy, tmp_path / "f.h5")).fingerprint == before
    images = sorted(copy.rglob("*.png"))
    images[0].unlink()
    removed = extract.provenance(extract_cfg(copy, tmp_path / "f.h5")).fingerprint
    assert removed != before
    # an image replaced by one of another size (a re-encoded or edited file)
    images[1].write_bytes(images[1].read_bytes() + b"\0")
    assert extract.provenance(extract_cfg(copy, tmp_path / "f.h5")).fingerprint not in (before, removed)


def test_cluster_and_pseudolabel_fingerprints(features_h5: Path, other_layer_features_h5: Path,
                                              clusters_h5: Path, tmp_path: Path) -> None:
    def cluster_print(**overrides) -> str:
        values = {"features": features_h5, "out": tmp_path / "c.h5", "k": 4} | overrides
        return cluster.provenance(ClusterConfig(**values)).fingerprint

    base = cluster_print()
    for display in ({"gpu": "off"}, {"chunk_rows": 5}, {"device": "cpu"}, {"workers": 0}, {"progress": False}):
        assert cluster_print(**display) == base, display
    for change in ({"k": 5}, {"seed": 1}, {"niter": 3}, {"pca_dim": 8}, {"backend": "torch"},
                   {"max_points_per_centroid": 10}, {"pca_sample": 50}, {"features": other_layer_features_h5}):
        assert cluster_print(**change) != base, change

    def label_print(**overrides) -> str:
        values = {"clusters": clusters_h5, "features": features_h5, "out": tmp_path / "l.h5"} | overrides
        return pseudolabel.provenance(PseudolabelConfig(**values)).fingerprint

    assert label_print() == label_print(chunk_rows=3, progress=False)
    # a change of the clusters' fingerprint alone (same bytes otherwise) changes the labels' fingerprint
    edited = tmp_path / "clusters.h5"
    shutil.copy(clusters_h5, edited)
    with h5py.File(edited, "r+") as handle:
        handle.attrs["fingerprint"] = "0" * 64
    assert label_print(clusters=edited) != label_print()


def test_class_names_travel_with_features_and_labels(features_h5: Path, labels_h5: Path) -> None:
    from ssl_cli.artifacts.h5 import read_root_attrs
    from ssl_cli.data.toy import class_names

    for path, kind in ((features_h5, "features"), (labels_h5, "labels")):
        with H5Artifact(path, kind) as artifact:
            assert artifact.attrs["classes"] == class_names(4), kind
        assert read_root_attrs(path)["classes"] == class_names(4), kind


def test_stored_config_is_what_the_user_asked_for(features_h5: Path, clusters_h5: Path) -> None:
    with H5Artifact(clusters_h5, "clusters") as artifact:
        config = artifact.attrs["config"]
    assert config["k"] == 4 and config["pca_dim"] == 16 and config["niter"] == 10
    assert config["features"] == str(features_h5)


# --- RowWriter ------------------------------------------------------------------------------------


def test_row_writer_create_append_commit(tmp_path: Path) -> None:
    out = tmp_path / "rows.h5"
    writer = RowWriter.create(out, _provenance(), COLUMNS, chunk_rows=4)
    partial = partial_path(out)
    assert partial == tmp_path / "rows.h5.partial"
    assert partial.exists() and not out.exists()
    writer.append(**_rows(0, 5))
    writer.append(**_rows(5, 3), attrs={"source_done": 9, "seen": ["a", "b"]})
    assert writer.rows_done == 8
    # attributes given with a block are recorded with it (as JSON where they are lists or dicts)
    assert writer.handle.attrs["source_done"] == 9 and json.loads(writer.handle.attrs["seen"]) == ["a", "b"]
    assert not out.exists(), "<out> must not appear before commit"
    assert writer.handle.attrs["rows_done"] == 8 and not writer.handle.attrs["complete"]
    assert writer.handle.filename == str(partial)
    assert writer.commit() == out
    assert out.exists() and not partial.exists()
    with H5Artifact(out, "features", required=tuple(COLUMNS)) as artifact:
        assert artifact.attrs["rows_done"] == 8 and artifact.attrs["complete"]
        expected = _rows(0, 8)
        np.testing.assert_array_equal(artifact.array("features"), expected["features"])
        assert list(artifact.strings("sample_ids")) == list(expected["sample_ids"])
        np.testing.assert_array_equal(artifact.array("targets"), expected["targets"])
        assert artifact.attrs["fingerprint"] == _provenance().fingerprint


def test_row_writer_refuses_ragged_or_missing_columns(tmp_path: Path) -> None:
    writer = RowWriter.create(tmp_path / "rows.h5", _provenance(), COLUMNS)
    rows = _rows(0, 4)
    with pytest.raises(ValueError, match="equal row counts"):
        writer.append(**(rows | {"targets": rows["targets"][:3]}))
    with pytest.raises(ValueError, match="needs columns"):
        writer.append(features=rows["features"], sample_ids=rows["sample_ids"])
    assert writer.rows_done == 0
    writer.close()


def test_commit_replaces_an_old_output_only_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "rows.h5"
    first = RowWriter.create(out, _provenance("a"), COLUMNS)
    first.append(**_rows(0, 2))
    first.commit()
    old = out.read_bytes()
    second = RowWriter.create(out, _provenance("b"), COLUMNS)
    second.append(**_rows(0, 6))
    assert out.read_bytes() == old, "the old output must stay whole until the new one is committed"
    second.commit()
    with H5Artifact(out, "features") as artifact:
        assert artifact.rows("features") == 6 and artifact.fingerprint == _provenance("b").fingerprint


def test_resume_continues_from_rows_done_and_drops_rows_beyond(tmp_path: Path) -> None:
    out = tmp_path / "rows.h5"
    provenance = _provenance()
    writer = RowWriter.create(out, provenance, COLUMNS)
    writer.append(**_rows(0, 6))
    writer.close()
    # Simulate a kill in the middle of the next append: datasets grown, rows half written,
    # rows_done not yet advanced.
    with h5py.File(partial_path(out), "r+") as handle:
        for name in COLUMNS:
            handle[name].resize(10, axis=0)
        handle["features"][6:10] = -1.0
        assert handle.attrs["rows_done"] == 6

    resumed = RowWriter.resume(out, provenance.fingerprint)
    assert resumed is not None and resumed.rows_done == 6
    for name in COLUMNS:
        assert resumed.handle[name].shape[0] == 6, "rows beyond rows_done must be dropped"
    resumed.append(**_rows(6, 4))
    resumed.commit()

    reference_out = tmp_path / "reference.h5"
    reference = RowWriter.create(reference_out, provenance, COLUMNS)
    reference.append(**_rows(0, 10))
    reference.commit()
    with H5Artifact(out, "features") as got, H5Artifact(reference_out, "features") as want:
        for name in ("features", "targets"):
            np.testing.assert_array_equal(got.array(name), want.array(name))
        assert list(got.strings("sample_ids")) == list(want.strings("sample_ids"))
        assert got.attrs["rows_done"] == 10


def test_resume_with_another_fingerprint_discards_the_partial(tmp_path: Path) -> None:
    out = tmp_path / "rows.h5"
    writer = RowWriter.create(out, _provenance("old"), COLUMNS)
    writer.append(**_rows(0, 3))
    writer.close()
    assert RowWriter.resume(out, _provenance("new").fingerprint) is None
    assert not partial_path(out).exists()
    assert RowWriter.resume(out, _provenance("old").fingerprint) is None  # nothing left to resume


def test_resume_of_an_unreadable_partial_starts_over(tmp_path: Path) -> None:
    out = tmp_path / "rows.h5"
    partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    assert RowWriter.resume(out, _provenance().fingerprint) is None
    assert not partial_path(out).exists()


def test_write_arrays_small_artifact(tmp_path: Path) -> None:
    out = write_arrays(tmp_path / "c.h5", _provenance(kind="clusters"),
                       {"centroids": np.eye(3, dtype=np.float32), "sample_ids": np.array(["a", "b"], dtype=object)},
                       attrs={"k": 3, "metrics": {"nmi": 0.5}})
    assert not partial_path(out).exists()
    with H5Artifact(out, "clusters") as artifact:
        np.testing.assert_array_equal(artifact.array("centroids"), np.eye(3))
        assert list(artifact.strings("sample_ids")) == ["a", "b"]
        assert artifact.attrs["metrics"] == {"nmi": 0.5} and artifact.attrs["k"] == 3


# --- output policy --------------------------------------------------------------------------------


def test_plan_output_states(tmp_path: Path) -> None:
    out = tmp_path / "rows.h5"
    this, other = _provenance("a"), _provenance("b")
    assert plan_output(out, this.fingerprint, force=False).state is OutputState.FRESH

    writer = RowWriter.create(out, this, COLUMNS)
    writer.append(**_rows(0, 2))
    writer.close()
    assert plan_output(out, this.fingerprint, force=False).state is OutputState.RESUME
    # a partial of other settings is thrown away, never resumed
    assert plan_output(out, other.fingerprint, force=False).state is OutputState.FRESH
    assert not partial_path(out).exists()

    writer = RowWriter.create(out, this, COLUMNS)
    writer.append(**_rows(0, 2))
    writer.commit()
    assert plan_output(out, this.fingerprint, force=False).up_to_date
    with pytest.raises(UserError, match="another fingerprint.*--force"):
        plan_output(out, other.fingerprint, force=False)
    before = out.read_bytes()
    assert plan_output(out, other.fingerprint, force=True).state is OutputState.FRESH
    assert out.read_bytes() == before, "--force replaces the output only when the new one is complete"
    # --force also recomputes an up-to-date output
    assert plan_output(out, this.fingerprint, force=True).state is OutputState.FRESH


# --- checkpoints ----------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    payload = {"model": {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.zeros(4)},
               "optimizer": {"step": 12, "lr": [0.1, 0.01]}, "epoch": 3,
               "meta": {"arch": "alexnet_lowres", "arch_kwargs": {"width": 0.5}, "input_size": 32,
                        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "task": "rotation"}}
    expected = {key: value for key, value in payload.items()}
    provenance = make_provenance("checkpoint", "pretext", {"lr": 0.1}, {"lr": 0.1}, [{"path": "x", "fingerprint": "y"}])
    path = save_checkpoint(tmp_path / "sub" / "model.pt", provenance, payload)
    return path, expected


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path, expected = _checkpoint(tmp_path)
    assert not path.with_name(path.name + ".tmp").exists()
    data = load_checkpoint(path)
    for key, value in expected["model"].items():
        assert torch.equal(data["model"][key], value)
    assert data["optimizer"] == {"step": 12, "lr": [0.1, 0.01]} and data["epoch"] == 3
    meta = data["meta"]
    assert meta["schema"] == "ssl-cli/checkpoint@1.0" and len(meta["fingerprint"]) == 64
    assert meta["arch"] == "alexnet_lowres" and meta["arch_kwargs"] == {"width": 0.5} and meta["task"] == "rotation"
    for key in ("config", "inputs", "code_version", "created"):
        assert key in meta
    info = describe_checkpoint(path)
    assert {item["name"] for item in info["datasets"]} == {"model/conv.weight", "model/conv.bias"}


def test_checkpoint_loads_with_plain_torch_weights_only(tmp_path: Path) -> None:
    path, expected = _checkpoint(tmp_path)
    data = torch.load(path, weights_only=True)
    assert torch.equal(data["model"]["conv.weight"], expected["model"]["conv.weight"])
    assert data["meta"]["arch"] == "alexnet_lowres"


class _Payload:
    """An arbitrary object; unpickling it would run code (here: create a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_arbitrary_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"meta": {"schema": "ssl-cli/checkpoint@1.0"}, "model": {}, "extra": _Payload(str(marker))}, path)
    with pytest.raises(UserError, match="not a loadable ssl-cli checkpoint"):
        load_checkpoint(path)
    assert not marker.exists(), "loading ran code from the pickle"


def test_a_plain_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"meta": {}, "x": _Payload(str(marker))}, protocol=2))
    with pytest.raises(UserError):
        load_checkpoint(path)
    assert not marker.exists(), "loading ran code from the pickle"


def test_torch_files_that_are_not_checkpoints(tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2)}, state)
    with pytest.raises(UserError, match="no 'meta'.*--weights"):
        load_checkpoint(state)
    wrong = tmp_path / "wrong.pt"
    torch.save({"meta": {"schema": "ssl-cli/features@1.0"}}, wrong)
    with pytest.raises(UserError, match="holds features, expected checkpoint"):
        load_checkpoint(wrong)
    newer = tmp_path / "newer.pt"
    torch.save({"meta": {"schema": "ssl-cli/checkpoint@2.1"}}, newer)
    with pytest.raises(UserError, match="checkpoint@2.1.*upgrade"):
        load_checkpoint(newer)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(UserError, match="not a loadable"):
        load_checkpoint(garbage)
