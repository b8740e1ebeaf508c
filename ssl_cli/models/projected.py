"""A backbone read through the first block of a pretext projection head: SimCLRv2's `proj1`.

SimCLRv2 finetunes "from the first layer of the projection head": trunk -> global average pool ->
Linear -> BatchNorm -> ReLU, then a new linear classifier. `ProjectedNetwork` is that network, so
the block is a named layer like any other: `ssl extract --layer proj1`, `ssl finetune --layers proj1`
(linear or kNN) and `ssl finetune --mode full` (which trains trunk, block and a new classifier;
its checkpoint is a teacher for `ssl self-train --teacher ... --soft`, the paper's distillation).

Layer names: the trunk's layers of the registry arch (conv1.., pool5 / layer4) under `backbone.`,
`proj1`, and `logits` once the network has a classifier. The backbone's own classifier (fc6, fc7)
was never trained by the pretext task and is not offered.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ssl_cli.models.registry import ArchSpec

LAYER = "proj1"


def projection_block(d_in: int, d_out: int) -> nn.Sequential:
    """(B, d_in) -> (B, d_out): Linear (no bias: the batch norm has one), BatchNorm1d, ReLU."""
    return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True))


def trunk_map(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, h, w): the last conv map of a registry arch (pool5, or layer4 for ResNets)."""
    if hasattr(backbone, "features"):
        return backbone.features(images)
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
    return backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))


class ProjectedNetwork(nn.Module):
    """images (B, 3, S, S) -> proj1 (B, width), or logits (B, classes) when built with classes."""

    def __init__(self, backbone: nn.Module, d_in: int, width: int, classes: int | None = None):
        super().__init__()
        self.backbone = backbone
        for name in ("classifier", "fc"):  # never run here: DDP refuses parameters that get no gradient
            if hasattr(backbone, name):
                getattr(backbone, name).requires_grad_(False)
        self.proj1 = projection_block(d_in, width)
        self.classifier = nn.Linear(width, classes) if classes else None
        self.d_in, self.width = d_in, width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.proj1(trunk_map(self.backbone, images).mean(dim=(2, 3)))
        return self.classifier(features) if self.classifier is not None else features


def projected_spec(spec: ArchSpec, with_classifier: bool) -> ArchSpec:
    """The arch's trunk layers under `backbone.`, then proj1 (the default feature layer) and logits."""
    trunk = {name: path for name, path in spec.layers.items()
             if name in spec.conv_layers or path.startswith("features.")}
    layers = {name: f"backbone.{path}" for name, path in trunk.items()} | {LAYER: LAYER}
    if with_classifier:
        layers["logits"] = "classifier"
    return replace(spec, layers=layers, feature_layer=LAYER)
