"""`ssl export`: torchvision state dicts that load strictly into the stock model, and safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

from ssl_cli.artifacts.checkpoint import save_checkpoint
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.errors import UserError
from ssl_cli.models.registry import build_model
from ssl_cli.stages import export


def _checkpoint(path: Path, arch: str, num_classes: int = 10, input_size: int = 32, **arch_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, **arch_kwargs)
    provenance = make_provenance("checkpoint", "test", {}, {}, [])
    meta = {"arch": arch, "arch_kwargs": {"num_classes": num_classes, **arch_kwargs}, "input_size": input_size}
    save_checkpoint(path, provenance, {"meta": meta, "model": model.state_dict()})
    return model.eval()


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("export") / "resnet18.pt"
    return path, _checkpoint(path, "resnet18")


def test_torchvision_export_loads_strictly_and_matches_outputs(resnet_checkpoint, tmp_path: Path) -> None:
    checkpoint, model = resnet_checkpoint
    out = tmp_path / "resnet18_tv.pt"
    result = export.run(checkpoint, "torchvision", out)
    assert (result.stage, result.out, result.status) == ("export", out, "written")
    assert result.summary["arch"] == "resnet18" and result.summary["num_classes"] == 10
    assert result.summary["format"] == "torchvision"
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert result.summary["tensors"] == len(state)
    stock = torchvision.models.resnet18(weights=None, num_classes=10)
    stock.load_state_dict(state, strict=True)
    stock.eval()
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(stock(batch), model(batch))
    assert not out.with_name(out.name + ".tmp").exists()


def test_safetensors_tensors_equal_state_dict(resnet_checkpoint, tmp_path: Path) -> None:
    checkpoint, model = resnet_checkpoint
    out = tmp_path / "resnet18.safetensors"
    result = export.run(checkpoint, "safetensors", out)
    tensors = load_file(out)
    expected = model.state_dict()
    assert set(tensors) == set(expected) and result.summary["tensors"] == len(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    with safe_open(out, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["arch"] == "resnet18" and metadata["num_classes"] == "10"
    assert metadata["input_size"] == "32" and metadata["source_fingerprint"]


def test_alexnet_exports_with_its_classifier(tmp_path: Path) -> None:
    checkpoint = tmp_path / "alexnet.pt"
    _checkpoint(checkpoint, "alexnet")
    out = tmp_path / "alexnet_tv.pt"
    result = export.run(checkpoint, "torchvision", out)
    assert result.summary["num_classes"] == 10
    stock = torchvision.models.alexnet(weights=None, num_classes=10)
    stock.load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_lowres_arch_refused_for_torchvision_but_safetensors_works(tmp_path: Path) -> None:
    checkpoint = tmp_path / "lowres.pt"
    _checkpoint(checkpoint, "resnet18_lowres", num_classes=4)
    out = tmp_path / "lowres_tv.pt"
    with pytest.raises(UserError, match="lowres"):
        export.run(checkpoint, "torchvision", out)
    assert not out.exists()
    result = export.run(checkpoint, "safetensors", tmp_path / "lowres.safetensors")
    assert result.summary["arch"] == "resnet18_lowres" and result.summary["num_classes"] == 4


def test_mismatching_weights_are_named_and_not_written(tmp_path: Path) -> None:
    checkpoint = tmp_path / "mislabelled.pt"
    model = build_model("resnet18_lowres", num_classes=10)
    provenance = make_provenance("checkpoint", "test", {}, {}, [])
    meta = {"arch": "resnet18", "arch_kwargs": {"num_classes": 10}, "input_size": 32}
    save_checkpoint(checkpoint, provenance, {"meta": meta, "model": model.state_dict()})
    out = tmp_path / "bad.pt"
    with pytest.raises(UserError, match="conv1.weight"):
        export.run(checkpoint, "torchvision", out)
    assert not out.exists()


def test_existing_out_refused_without_force(resnet_checkpoint, tmp_path: Path) -> None:
    checkpoint, _ = resnet_checkpoint
    out = tmp_path / "taken.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="exists; pass --force"):
        export.run(checkpoint, "torchvision", out)
    assert out.read_bytes() == b"keep me"
    export.run(checkpoint, "torchvision", out, force=True)
    assert set(torch.load(out, weights_only=True)) == set(build_model("resnet18", num_classes=10).state_dict())


def test_unknown_format_refused(resnet_checkpoint, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="valid formats"):
        export.run(resnet_checkpoint[0], "onnx", tmp_path / "x.onnx")
