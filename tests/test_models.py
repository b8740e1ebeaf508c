"""The model registry: every arch builds, named layers give (B, D) features, unknown names list the
valid ones, nothing is downloaded, and `--weights FILE` loads a local state dict."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ssl_cli.errors import UserError
from ssl_cli.models.layers import LayerReader, load_weights
from ssl_cli.models.network import network_from_arch
from ssl_cli.models.registry import ArchSpec, arch_names, build_model, check_layer, get_arch, register

LOWRES = [name for name in arch_names() if name.endswith("_lowres")]
BIG = [name for name in arch_names() if not name.endswith("_lowres")]
# Thin variants keep the per-layer sweep cheap; resnets take no width option.
THIN = {"alexnet_lowres": {"width": 0.25, "fc_width": 64}, "vgg16_lowres": {"width": 0.125, "fc_width": 64},
        "vgg16_bn_lowres": {"width": 0.125, "fc_width": 64}}
# For the big archs, two layers at their minimum input size: one conv map and one vector layer.
BIG_LAYERS = {"alexnet": ("conv1", "fc6"), "vgg16": ("conv2", "pool5"), "vgg16_bn": ("conv1", "pool5"),
              "resnet18": ("layer2", "pool"), "resnet50": ("conv1", "pool")}


def test_registry_has_the_contract_archs() -> None:
    names = set(arch_names())
    assert {"alexnet", "vgg16", "vgg16_bn", "resnet18", "resnet50"} <= names
    assert LOWRES, "there must be low-resolution variants for 32-64 px"
    assert arch_names() == sorted(arch_names())
    for name in names:
        spec = get_arch(name)
        assert spec.feature_layer in spec.layers and spec.trunk_layer in spec.layers
        assert set(spec.conv_layers) <= set(spec.layers)
        assert spec.min_input_size <= spec.input_size


def test_registering_a_duplicate_name_fails_loudly() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(get_arch("resnet18"))


@pytest.mark.parametrize("name", LOWRES)
def test_every_layer_of_the_lowres_archs(name: str) -> None:
    spec = get_arch(name)
    torch.manual_seed(0)
    model = build_model(name, **THIN.get(name, {})).eval()
    images = torch.randn(2, 3, 32, 32)
    dims = {}
    for layer in spec.layers:
        reader = LayerReader(model, spec, layer, pool="avg", pool_size=1).eval()
        with torch.no_grad():
            features = reader(images)
        assert features.ndim == 2 and features.shape[0] == 2, (layer, features.shape)
        assert torch.isfinite(features).all()
        dims[layer] = features.shape[1]
    assert dims["logits"] == 1000
    # conv maps pooled to s x s give s * s times the channels; unpooled give channels x h x w
    conv = spec.conv_layers[-1]
    with torch.no_grad():
        pooled2 = LayerReader(model, spec, conv, pool="max", pool_size=2).eval()(images)
        whole = LayerReader(model, spec, conv, pool="none").eval()(images)
    assert pooled2.shape == (2, dims[conv] * 4)
    assert whole.shape[1] >= dims[conv] and whole.shape[1] % dims[conv] == 0


@pytest.mark.parametrize("name", BIG)
def test_big_archs_at_their_minimum_size(name: str) -> None:
    spec = get_arch(name)
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    images = torch.randn(1, 3, spec.min_input_size, spec.min_input_size)
    for layer in BIG_LAYERS[name]:
        with torch.no_grad():
            features = LayerReader(model, spec, layer).eval()(images)
        assert features.ndim == 2 and features.shape[0] == 1 and features.shape[1] > 0
        assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_stock_archs_keep_torchvision_state_dict_names(name: str) -> None:
    import torchvision

    ours = build_model(name, num_classes=10).state_dict()
    stock = getattr(torchvision.models, name)(weights=None, num_classes=10).state_dict()
    assert {key: tuple(value.shape) for key, value in ours.items()} == \
        {key: tuple(value.shape) for key, value in stock.items()}


def test_unknown_arch_lists_every_valid_name() -> None:
    with pytest.raises(UserError) as error:
        get_arch("resnet19")
    message = str(error.value)
    assert "unknown arch 'resnet19'" in message
    for name in arch_names():
        assert name in message
    with pytest.raises(UserError, match="unknown arch"):
        build_model("vgg11")


def test_unknown_layer_lists_every_valid_layer() -> None:
    spec: ArchSpec = get_arch("alexnet_lowres")
    with pytest.raises(UserError) as error:
        check_layer(spec, "layer4")
    message = str(error.value)
    assert "no layer 'layer4'" in message
    for layer in spec.layers:
        assert layer in message


def test_bad_arch_options_are_a_user_error() -> None:
    with pytest.raises(UserError, match="bad arch options"):
        build_model("resnet18_lowres", width=0.5)
    with pytest.raises(UserError, match="bad arch options"):
        build_model("alexnet_lowres", depth=3)


@pytest.mark.parametrize("kwargs", [{"weights": "IMAGENET1K_V1"}, {"pretrained": True}])
@pytest.mark.parametrize("name", ["alexnet", "resnet18", "vgg16_lowres"])
def test_hub_weights_are_never_downloaded(name: str, kwargs: dict, monkeypatch, tmp_path: Path) -> None:
    import torch.hub

    def no_network(*args, **kw):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as error:
        build_model(name, **kwargs)
    assert "never downloaded" in str(error.value) and "--weights" in str(error.value)
    assert not any(tmp_path.iterdir())


def test_weights_none_is_a_random_init() -> None:
    torch.manual_seed(0)
    first = build_model("alexnet_lowres", weights=None, **THIN["alexnet_lowres"])
    torch.manual_seed(0)
    second = build_model("alexnet_lowres", **THIN["alexnet_lowres"])
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])


def test_network_from_arch_is_seeded_and_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = network_from_arch("alexnet_lowres", None, None, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = network_from_arch("alexnet_lowres", None, None, seed=3)
    c = network_from_arch("alexnet_lowres", None, None, seed=4)
    key = "features.0.weight"
    assert torch.equal(a.model.state_dict()[key], b.model.state_dict()[key])
    assert not torch.equal(a.model.state_dict()[key], c.model.state_dict()[key])
    assert a.input_size == 32 and a.describe()["arch"] == "alexnet_lowres"


def test_weights_file_loads_a_state_dict_of_the_same_arch(tmp_path: Path) -> None:
    source = network_from_arch("resnet18_lowres", None, None, seed=7)
    weights = tmp_path / "r18.pt"
    torch.save(source.model.state_dict(), weights)
    loaded = network_from_arch("resnet18_lowres", weights, None, seed=0)
    assert loaded.inputs[0]["path"] == str(weights)
    images = torch.randn(3, 3, 32, 32)
    spec = get_arch("resnet18_lowres")
    with torch.no_grad():
        want = LayerReader(source.model, spec, "layer2").eval()(images)
        got = LayerReader(loaded.model, spec, "layer2").eval()(images)
        other = LayerReader(network_from_arch("resnet18_lowres", None, None, seed=0).model, spec, "layer2").eval()(images)
    assert torch.equal(got, want)
    assert not torch.allclose(other, want)


def test_extract_with_weights_equals_the_source_model(toy_dir: Path, features_h5: Path, extract_cfg,
                                                      tmp_path: Path) -> None:
    """The session features come from seed 0; its weights loaded into a seed-1 model give them back."""
    from ssl_cli.stages import extract

    weights = tmp_path / "alexnet_lowres.pt"
    torch.save(network_from_arch("alexnet_lowres", None, None, seed=0).model.state_dict(), weights)
    out = tmp_path / "f.h5"
    extract.run(extract_cfg(toy_dir, out, weights=weights, seed=1))
    with h5py.File(out, "r") as got, h5py.File(features_h5, "r") as want:
        np.testing.assert_array_equal(got["features"][...], want["features"][...])
        assert got.attrs["fingerprint"] != want.attrs["fingerprint"]  # other inputs, same numbers


def test_weights_file_of_another_arch_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "r18.pt"
    torch.save(build_model("resnet18_lowres").state_dict(), weights)
    with pytest.raises(UserError, match="does not fit this arch"):
        network_from_arch("alexnet_lowres", weights, None, seed=0)


def test_weights_with_another_head_keep_the_trunk(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model("resnet18_lowres", num_classes=10)
    weights = tmp_path / "r18-10.pt"
    torch.save({"model": source.state_dict(), "meta": {"note": "an ssl checkpoint-like dict"}}, weights)
    target = build_model("resnet18_lowres", num_classes=5)
    left = load_weights(target, weights)
    assert set(left) == {"fc.weight", "fc.bias"}
    assert torch.equal(target.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])


def test_image_size_below_the_minimum_is_refused() -> None:
    with pytest.raises(UserError, match="too small for alexnet.*minimum 63"):
        network_from_arch("alexnet", None, 32, seed=0)
