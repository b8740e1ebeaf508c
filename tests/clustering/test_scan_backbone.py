"""`ssl cluster --method scan --scan-backbone train` (SCAN as published): the SCAN step and self-labelling
train the pretext network with the heads. Checked on toy images: the network's weights move, the network
checkpoint beside the output is one `ssl extract --model` reads, `ssl pseudolabel` of the linked features
gives the clusters' assignments, the files do not collide with the frozen variant's, a re-run is up to date,
and a run killed in the SCAN step resumes to the same network and clusters."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scan_files import intermediates, rotation_checkpoint

from ssl_cli.artifacts.checkpoint import load_checkpoint

TRAIN = ["--k", "4", "--scan-epochs", "2", "--self-label-epochs", "1", "--batch-size", "32", "--lr", "0.001",
         "--backbone-lr", "0.001", "--heads", "2", "--neighbours-k", "5", "--threshold", "0.5", "--workers", "0",
         "--device", "cpu", "--no-progress", "--scan-backbone", "train"]


@pytest.fixture(scope="module")
def pretext_pt(toy_dir, tmp_path_factory, cli):
    return rotation_checkpoint(cli, toy_dir, tmp_path_factory.mktemp("scan-train") / "rotation.pt")




@pytest.fixture(scope="module")
def trained(pretext_pt, toy_dir, cli):
    out = pretext_pt.parent / "clusters.h5"
    result = cli("cluster", "--method", "scan", "--model", pretext_pt, "--data", toy_dir, *TRAIN, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def network_state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_the_network_trains_and_is_written_beside_the_clusters(trained, pretext_pt):
    files = intermediates(trained)
    assert {"features", "neighbours", "scan", "scan_features", "selflabel", "network_features"} <= set(files)
    network = trained.with_name("clusters.network.pt")
    assert network.resolve() == files["selflabel"].resolve() and files["selflabel"].parent.name == "scan-cache"
    after, before = network_state(network), network_state(pretext_pt)
    assert after.keys() == before.keys()  # the pretext checkpoint's layout: the same tensors, untrained ones left out
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert any(name.startswith("features.0.") for name in moved)  # the first conv learnt
    assert not torch.equal(network_state(files["scan"])["features.0.weight"], before["features.0.weight"])
    meta = load_checkpoint(network)["meta"]
    assert meta["arch"] == "alexnet_bn_lowres" and meta["input_size"] == 32 and meta["feature_layer"]
    with h5py.File(trained) as handle:
        assert handle.attrs["scan_backbone"] == "train" and handle.attrs["network"] == str(network)
        assert json.loads(handle.attrs["config"])["scan_backbone"] == "train"
    assert trained.with_name("clusters.features.h5").resolve() == files["network_features"].resolve()


def test_extract_of_the_network_and_pseudolabel_give_the_clusters(trained, toy_dir, cli, tmp_path):
    features = tmp_path / "features.h5"
    result = cli("extract", "--model", trained.with_name("clusters.network.pt"), "--data", toy_dir, "--workers", "0",
                 "--device", "cpu", "--no-progress", "--out", features)
    assert result.exit_code == 0, result.output
    with h5py.File(features) as mine, h5py.File(trained.with_name("clusters.features.h5")) as linked:
        assert np.allclose(mine["features"][...], linked["features"][...], atol=1e-5)
    labels = tmp_path / "labels.h5"
    result = cli("pseudolabel", "--clusters", trained, "--features", trained.with_name("clusters.features.h5"),
                 "--out", labels, "--no-progress")
    assert result.exit_code == 0, result.output
    with h5py.File(trained) as clusters, h5py.File(labels) as labelled:
        assert np.array_equal(clusters["assignments"][...], labelled["labels"][...])
        assert np.allclose(clusters["confidence"][...], labelled["confidence"][...], atol=1e-5)


def test_a_rerun_is_up_to_date_and_the_frozen_variant_has_files_of_its_own(trained, pretext_pt, toy_dir, cli):
    result = cli("cluster", "--method", "scan", "--model", pretext_pt, "--data", toy_dir, *TRAIN, "--out", trained)
    assert result.exit_code == 0 and f"{trained} is up to date" in result.output, result.output
    frozen = trained.with_name("frozen.h5")
    result = cli("cluster", "--method", "scan", "--model", pretext_pt, "--data", toy_dir, *TRAIN[:-1], "frozen",
                 "--no-self-label", "--out", frozen)
    assert result.exit_code == 0, result.output
    mine, theirs = intermediates(trained), intermediates(frozen)
    assert theirs["features"] == mine["features"] and theirs["neighbours"] == mine["neighbours"]  # mined once
    assert theirs["scan"] != mine["scan"] and "network_features" not in theirs
    assert not frozen.with_name("frozen.network.pt").exists()
    with h5py.File(trained) as one, h5py.File(frozen) as other:
        assert one.attrs["fingerprint"] != other.attrs["fingerprint"] and other.attrs["scan_backbone"] == "frozen"


def test_a_run_killed_in_the_scan_step_resumes_to_the_same_network_and_clusters(trained, pretext_pt, toy_dir, cli,
                                                                                 tmp_path, monkeypatch):
    import ssl_cli.train.loop as loop

    calls = {"n": 0}
    real = loop.distributed.any_rank

    def stop_after(flag, group, device):  # SIGINT after the SCAN step's 4th of 6 steps (epoch 2)
        calls["n"] += 1
        return real(flag or calls["n"] == 4, group, device)

    monkeypatch.setattr(loop.distributed, "any_rank", stop_after)
    out = tmp_path / "clusters.h5"
    command = ["cluster", "--method", "scan", "--model", pretext_pt, "--data", toy_dir, *TRAIN, "--out", out]
    result = cli(*command)
    assert result.exit_code == 130, result.output
    assert [path.name for path in (tmp_path / "scan-cache").glob("scan-*.pt.partial")]
    monkeypatch.undo()
    result = cli(*command)
    assert result.exit_code == 0 and "resuming" in result.output, result.output
    for name in ("scan", "selflabel"):
        want, got = network_state(intermediates(trained)[name]), network_state(intermediates(out)[name])
        assert all(torch.equal(want[key], got[key]) for key in want), name
    with h5py.File(trained) as first, h5py.File(out) as second:
        assert np.array_equal(first["assignments"][...], second["assignments"][...])
        assert np.array_equal(first["head_weight"][...], second["head_weight"][...])
