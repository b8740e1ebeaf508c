"""A registry of architectures that fails loudly, built on torchvision's module layouts.

Every arch keeps torchvision's attribute names (`features`, `avgpool`, `classifier`, `fc`, ...)
so state dicts of the stock archs load into `torchvision.models.<arch>()` unchanged. Named
layers map to module paths, read with torchvision's feature extractor (which prunes the graph
after the requested layer, so asking for conv2 never runs fc7).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.vgg import make_layers

from ssl_cli.errors import UserError
from ssl_cli.models.catalog import CATALOG, VGG16_CFG, ArchEntry, arch_names, unknown_arch

__all__ = ["ArchSpec", "arch_names", "build_model", "check_layer", "get_arch", "register"]


@dataclass(frozen=True)
class ArchSpec(ArchEntry):
    """A catalog entry (`models.catalog`: named layers, sizes, description) with its builder."""

    build: Callable[..., nn.Module] | None = None


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"arch {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_arch(name: str) -> ArchSpec:
    if name not in _REGISTRY:
        raise UserError(unknown_arch(name))
    return _REGISTRY[name]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build an arch with random initialisation. Nothing is ever downloaded."""
    for key in ("weights", "pretrained"):
        if kwargs.get(key):
            raise UserError(
                f"{name}: hub weights are never downloaded; pass --weights FILE with a local state dict"
            )
        kwargs.pop(key, None)
    spec = get_arch(name)
    try:
        return spec.build(**kwargs)
    except TypeError as error:
        raise UserError(f"{name}: bad arch options {kwargs}: {error}") from None


def resolved_kwargs(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every option the builder of `name` uses, `kwargs` over its defaults: what a checkpoint and a
    fingerprint record, so that a changed default (dropout, width) is seen as a different network."""
    spec = get_arch(name)
    given = {key: value for key, value in (kwargs or {}).items() if key not in ("weights", "pretrained")}
    try:
        bound = inspect.signature(spec.build).bind(**given)
    except TypeError as error:
        raise UserError(f"{name}: bad arch options {given}: {error}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def builder_accepts(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The entries of `kwargs` that the current builder of `name` still takes (a checkpoint's recorded options
    outlive a renamed or removed one)."""
    accepted = inspect.signature(get_arch(name).build).parameters
    return {key: value for key, value in kwargs.items() if key in accepted}


def check_layer(spec: ArchSpec, layer: str) -> str:
    if layer not in spec.layers:
        raise UserError(f"arch {spec.name} has no layer {layer!r}; valid layers: {', '.join(spec.layers)}")
    return spec.layers[layer]


# --- AlexNet -------------------------------------------------------------------------------------

def _alexnet(num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    return tvm.alexnet(weights=None, num_classes=num_classes, dropout=dropout)


def _lowres_alexnet_head(model: nn.Module, channels: int, fc_width: int, num_classes: int, dropout: float) -> nn.Module:
    """The lowres AlexNets' head: conv maps pooled to 2x2, then fc6, fc7 (`fc_width` wide) and the logits."""
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    model.classifier = nn.Sequential(
        nn.Dropout(dropout), nn.Linear(channels * 4, fc_width), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True),
        nn.Linear(fc_width, num_classes),
    )
    return model


def _alexnet_lowres(num_classes: int = 1000, dropout: float = 0.5, width: float = 1.0, fc_width: int = 1024) -> nn.Module:
    """AlexNet for 32-64 px: 5x5 stride-1 conv1, the same 13-module `features` layout."""
    c1, c2, c3, c4, c5 = (max(8, int(round(c * width))) for c in (64, 192, 384, 256, 256))
    model = tvm.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    model.features = nn.Sequential(
        nn.Conv2d(3, c1, 5, stride=1, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )
    return _lowres_alexnet_head(model, c5, fc_width, num_classes, dropout)


def _alexnet_bn_lowres(num_classes: int = 1000, dropout: float = 0.0, width: float = 0.25, fc_width: int = 512) -> nn.Module:
    """alexnet_lowres with batch norm after every conv (the AlexNet of DeepCluster): each conv layer
    keeps learning at the rates that train small images fast. Default width 0.25 (16-48-96-64-64
    channels, about 9M multiply-adds at 28 px) and no dropout: bench/recipes.py's picks for 28-32 px
    on a CPU (dropout 0.5 cost 0.5 points at 100 labels per class). The Dropout modules stay, so
    `ssl self-train --dropout` can still noise a student."""
    c1, c2, c3, c4, c5 = (max(8, int(round(c * width))) for c in (64, 192, 384, 256, 256))

    def conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    model = tvm.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    model.features = nn.Sequential(
        *conv(3, c1, 5), nn.MaxPool2d(3, 2),
        *conv(c1, c2, 5), nn.MaxPool2d(3, 2),
        *conv(c2, c3, 3), *conv(c3, c4, 3), *conv(c4, c5, 3), nn.MaxPool2d(3, 2),
    )
    return _lowres_alexnet_head(model, c5, fc_width, num_classes, dropout)


# --- a small convnet for 28-32 px ------------------------------------------------------------------

class SmallConvNet(nn.Module):
    """`features` (5 convs 3x3 with batch norm and ReLU, max-pooled after conv1, conv2 and conv4:
    28 -> 14 -> 7 -> 3), global average pool, `classifier` (dropout, linear): torchvision's layout."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.0, width: float = 1.0):
        super().__init__()
        c1, c2, c3, c4, c5 = (max(8, int(round(c * width))) for c in (32, 32, 64, 64, 128))

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*conv(3, c1), nn.MaxPool2d(2), *conv(c1, c2), nn.MaxPool2d(2), *conv(c2, c3),
                                      *conv(c3, c4), nn.MaxPool2d(2), *conv(c4, c5))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c5, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(images))))


def _convnet_bn_lowres(num_classes: int = 1000, dropout: float = 0.0, width: float = 1.0) -> nn.Module:
    """The small-image baseline net of issue 12's plain script (32-32-64-64-128 channels, about 5M
    multiply-adds at 28 px): from scratch on Fashion-MNIST it beats alexnet_bn_lowres by about a point
    at a third of the compute (bench/recipes.py), because it keeps a 3x3 map to pool where the AlexNet's
    3x3/2 poolings leave 2x2 and its fc6/fc7 overfit 1,000 images."""
    return SmallConvNet(num_classes, dropout, width)


# --- VGG -----------------------------------------------------------------------------------------

def _vgg16(num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    return tvm.vgg16(weights=None, num_classes=num_classes, dropout=dropout)


def _vgg16_bn(num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    return tvm.vgg16_bn(weights=None, num_classes=num_classes, dropout=dropout)


def _vgg_lowres(batch_norm: bool):
    def build(num_classes: int = 1000, dropout: float = 0.5, width: float = 1.0, fc_width: int = 1024) -> nn.Module:
        """VGG16 for 32-64 px: the same conv stack (optionally thinner), 1x1 pooled, small fc."""
        cfg = [item if item == "M" else max(8, int(round(item * width))) for item in VGG16_CFG]
        model = tvm.VGG(make_layers(cfg, batch_norm=batch_norm), num_classes=num_classes, dropout=dropout)
        model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        model.classifier = nn.Sequential(
            nn.Linear(cfg[-2], fc_width), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(fc_width, num_classes),
        )
        return model

    return build


# --- ResNet --------------------------------------------------------------------------------------

def _resnet(builder: Callable[..., nn.Module], lowres: bool):
    def build(num_classes: int = 1000, width: float = 1.0) -> nn.Module:
        if width != 1.0:
            raise TypeError("resnets take no width option")
        model = builder(weights=None, num_classes=num_classes)
        if lowres:
            # CIFAR-style stem: 3x3 stride-1 conv1 and no max-pool keep 32 px maps large enough.
            model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model

    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": _alexnet, "alexnet_lowres": _alexnet_lowres, "alexnet_bn_lowres": _alexnet_bn_lowres,
    "convnet_bn_lowres": _convnet_bn_lowres, "vgg16": _vgg16, "vgg16_bn": _vgg16_bn,
    "vgg16_lowres": _vgg_lowres(False), "vgg16_bn_lowres": _vgg_lowres(True),
    "resnet18": _resnet(tvm.resnet18, False), "resnet50": _resnet(tvm.resnet50, False),
    "resnet18_lowres": _resnet(tvm.resnet18, True), "resnet50_lowres": _resnet(tvm.resnet50, True),
}
if set(_BUILDERS) != set(CATALOG):
    raise ValueError(f"archs without a builder or a catalog entry: {sorted(set(_BUILDERS) ^ set(CATALOG))}")
for _entry in CATALOG.values():
    register(ArchSpec(**{f.name: getattr(_entry, f.name) for f in fields(_entry)}, build=_BUILDERS[_entry.name]))
