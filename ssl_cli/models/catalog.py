"""The architectures by name: their named layers, input sizes and descriptions, as plain data.

`models.registry` pairs each entry with its builder (torch); this module imports nothing heavy,
so help texts and the command line's early checks list and check arch names before torch loads.
Named layers map to module paths in torchvision's layout (`features`, `avgpool`, `classifier`,
`fc`, ...)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchEntry:
    name: str
    layers: dict[str, str]  # layer name -> module path, in forward order
    input_size: int  # default input size
    min_input_size: int
    feature_layer: str  # default layer for `ssl extract`
    trunk_layer: str  # last layer of the trunk a pretext head sits on
    conv_layers: tuple[str, ...] = field(default=())
    description: str = ""


ALEXNET_LAYERS = {
    "conv1": "features.1", "conv2": "features.4", "conv3": "features.7", "conv4": "features.9",
    "conv5": "features.11", "pool5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5",
    "logits": "classifier.6",
}
ALEXNET_BN_LAYERS = {
    "conv1": "features.2", "conv2": "features.6", "conv3": "features.10", "conv4": "features.13",
    "conv5": "features.16", "pool5": "features.17", "fc6": "classifier.2", "fc7": "classifier.5",
    "logits": "classifier.6",
}
CONVNET_LAYERS = {
    "conv1": "features.2", "conv2": "features.6", "conv3": "features.10", "conv4": "features.13",
    "conv5": "features.17", "pool": "flatten", "logits": "classifier.1",
}
RESNET_LAYERS = {
    "conv1": "relu", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4",
    "pool": "flatten", "logits": "fc",
}
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg_layers(batch_norm: bool) -> dict[str, str]:
    """conv1..conv5 = the last ReLU of each block, pool5 = the last max-pool."""
    layers, index, block = {}, 0, 1
    for item in VGG16_CFG:
        if item == "M":
            layers[f"conv{block}"] = f"features.{index - 1}"
            block += 1
            index += 1
        else:
            index += 3 if batch_norm else 2
    layers["pool5"] = f"features.{index - 1}"
    layers.update({"fc6": "classifier.1", "fc7": "classifier.4", "logits": "classifier.6"})
    return layers


_CONV = ("conv1", "conv2", "conv3", "conv4", "conv5")
_RES_CONV = ("conv1", "layer1", "layer2", "layer3", "layer4")

CATALOG: dict[str, ArchEntry] = {entry.name: entry for entry in (
    ArchEntry("alexnet", ALEXNET_LAYERS, 224, 63, "fc7", "pool5", _CONV, "torchvision AlexNet"),
    ArchEntry("alexnet_lowres", ALEXNET_LAYERS, 32, 16, "fc7", "pool5", _CONV,
              "AlexNet for 32-64 px (5x5/1 conv1; width, fc_width options)"),
    ArchEntry("alexnet_bn_lowres", ALEXNET_BN_LAYERS, 32, 16, "fc7", "pool5", _CONV,
              "AlexNet with batch norm for 28-64 px, width 0.25 by default: the pick for small images"),
    ArchEntry("convnet_bn_lowres", CONVNET_LAYERS, 32, 8, "pool", "conv5", _CONV,
              "5-conv net with batch norm for 28-32 px (32-64-128 channels; width, dropout options): the pick for "
              "training from scratch on small images"),
    ArchEntry("vgg16", vgg_layers(False), 224, 32, "fc7", "pool5", _CONV, "torchvision VGG16"),
    ArchEntry("vgg16_bn", vgg_layers(True), 224, 32, "fc7", "pool5", _CONV, "torchvision VGG16-BN"),
    ArchEntry("vgg16_lowres", vgg_layers(False), 32, 32, "fc7", "pool5", _CONV,
              "VGG16 for 32-64 px (1x1 pooled; width, fc_width options)"),
    ArchEntry("vgg16_bn_lowres", vgg_layers(True), 32, 32, "fc7", "pool5", _CONV,
              "VGG16-BN for 32-64 px (1x1 pooled; width, fc_width options)"),
    ArchEntry("resnet18", RESNET_LAYERS, 224, 32, "pool", "pool", _RES_CONV, "torchvision ResNet-18"),
    ArchEntry("resnet50", RESNET_LAYERS, 224, 32, "pool", "pool", _RES_CONV, "torchvision ResNet-50"),
    ArchEntry("resnet18_lowres", RESNET_LAYERS, 32, 8, "pool", "pool", _RES_CONV,
              "ResNet-18 with a CIFAR stem for 32-64 px"),
    ArchEntry("resnet50_lowres", RESNET_LAYERS, 32, 8, "pool", "pool", _RES_CONV,
              "ResNet-50 with a CIFAR stem for 32-64 px"),
)}


def arch_names() -> list[str]:
    return sorted(CATALOG)


def unknown_arch(name: str) -> str:
    """The message for a name that is not an arch, with the closest spelling."""
    close = difflib.get_close_matches(name, CATALOG, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown arch {name!r}{hint}; valid archs: {', '.join(arch_names())}"
