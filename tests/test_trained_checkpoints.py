"""Checkpoints hold what was trained (no untouched classifier), and fingerprints see the builders' defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from ssl_cli.artifacts.checkpoint import save_checkpoint
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.config import ExtractConfig, PretextConfig, SelfTrainConfig, SupervisedConfig
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.errors import UserError
from ssl_cli.models import registry
from ssl_cli.models.layers import LayerReader
from ssl_cli.models.network import network_from_checkpoint
from ssl_cli.models.registry import build_model
from ssl_cli.stages import export, extract, pretext, self_train, train

CPU = {"workers": 0, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "images"
    write_toy_folder(root, n=8, classes=2, size=32, seed=0)
    return root


def rotation(data: Path, out: Path, arch: str, **values) -> PretextConfig:
    return PretextConfig(task="rotation", arch=arch, data=str(data), out=out, image_size=32, batch_size=8, epochs=1,
                         seed=3, **CPU, **values)


def test_vgg16_pretext_checkpoint_holds_the_trunk_and_exports_into_torchvision(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "vgg16.pt"
    pretext.run(rotation(toy, out, "vgg16"))
    data = torch.load(out, weights_only=True)
    assert not [key for key in data["model"] if key.startswith("classifier.")]
    assert data["meta"]["untrained"]["modules"] == ["classifier"]
    with torch.device("meta"):
        stock = torchvision.models.vgg16(weights=None)
    full_bytes = sum(t.numel() * t.element_size() for t in stock.state_dict().values())
    assert out.stat().st_size < 0.15 * full_bytes  # the trunk is 59 MB of VGG16's 553 MB

    exported = tmp_path / "vgg16_tv.pt"
    result = export.run(out, "torchvision", exported)
    assert all(layer in result.summary["filled"] for layer in ("classifier.0", "classifier.3", "classifier.6"))
    assert "seed 3" in result.summary["filled"]
    state = torch.load(exported, weights_only=True)
    stock.load_state_dict(state, strict=True, assign=True)  # on the meta device: names and shapes, strictly
    for key, value in data["model"].items():
        assert torch.equal(state[key], value), key


def test_a_checkpoint_without_its_classifier_rebuilds_the_same_network(toy: Path, tmp_path: Path) -> None:
    """The left-out classifier comes back as the pretext run held it (same seed), so extract --layer fc7 and
    finetune read what they read before the checkpoint shrank."""
    out = tmp_path / "alexnet.pt"
    pretext.run(rotation(toy, out, "alexnet_lowres", width=0.25))
    network = network_from_checkpoint(out)
    torch.manual_seed(3)
    reference = build_model("alexnet_lowres", width=0.25).state_dict()
    for key, value in network.model.state_dict().items():
        if key.startswith("classifier."):
            assert torch.equal(value, reference[key]), key
    assert LayerReader(network.model, network.spec, "fc7").eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 1024)

    data = torch.load(out, weights_only=True)
    del data["model"]["features.0.weight"]  # a trained tensor missing is damage, not an untrained layer
    damaged = tmp_path / "damaged.pt"
    torch.save(data, damaged)
    with pytest.raises(UserError, match="lacks trained tensors"):
        network_from_checkpoint(damaged)


def test_checkpoint_records_resolved_arch_kwargs_and_old_ones_still_load(tmp_path: Path) -> None:
    old = tmp_path / "old.pt"  # written before arch_kwargs_resolved existed: only the passed options
    model = build_model("alexnet_lowres", width=0.25, num_classes=4)
    meta = {"arch": "alexnet_lowres", "arch_kwargs": {"width": 0.25, "num_classes": 4}, "input_size": 32}
    save_checkpoint(old, make_provenance("checkpoint", "test", {}, {}, []), {"meta": meta, "model": model.state_dict()})
    network = network_from_checkpoint(old)
    assert network.describe()["arch_kwargs_resolved"] == {"num_classes": 4, "dropout": 0.5, "width": 0.25,
                                                           "fc_width": 1024}


def _fingerprints(toy: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "extract": extract.provenance(ExtractConfig(data=str(toy), out=tmp_path / "f.h5", arch="alexnet_lowres",
                                                    layer="conv2", **CPU)).fingerprint,
        "pretext": pretext.provenance(rotation(toy, tmp_path / "p.pt", "alexnet_lowres")).fingerprint,
        "train": train.provenance(SupervisedConfig(data=str(toy), eval_data=str(toy), out=tmp_path / "t.pt",
                                                   arch="alexnet_lowres", **CPU)).fingerprint,
        "self-train": self_train.provenance(SelfTrainConfig(labelled=str(toy), unlabelled=str(toy), eval_data=str(toy),
                                                            out=tmp_path / "st", arch="alexnet_lowres",
                                                            **CPU)).fingerprint,
    }


def test_a_changed_builder_default_changes_every_fingerprint(toy: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = _fingerprints(toy, tmp_path)
    assert _fingerprints(toy, tmp_path) == before
    builder = registry.get_arch("alexnet_lowres").build
    num_classes, dropout, width, fc_width = builder.__defaults__
    monkeypatch.setattr(builder, "__defaults__", (num_classes, dropout / 2, width, fc_width))
    after = _fingerprints(toy, tmp_path)
    assert [stage for stage in before if after[stage] == before[stage]] == []


def test_a_changed_builder_default_reruns_extract(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ExtractConfig(data=str(toy), out=tmp_path / "f.h5", arch="alexnet_lowres", layer="conv1", width=0.25, **CPU)
    extract.run(cfg)
    assert extract.run(cfg).status == "up to date"
    builder = registry.get_arch("alexnet_lowres").build
    num_classes, _, width, fc_width = builder.__defaults__
    monkeypatch.setattr(builder, "__defaults__", (num_classes, 0.1, width, fc_width))
    with pytest.raises(UserError, match="another fingerprint"):
        extract.run(cfg)
