"""SimCLR (Chen et al. 2020) and SimCLRv2 (Chen et al. 2020b): two views of every image, a projection
MLP, and NT-Xent over the 2B views of the batch (`ssl_cli.pretext.losses.nt_xent`).

inputs: two views (B, 3, S, S) made on the device (`ssl_cli.data.views`); output: their projections
z1, z2 (B, projection_dim). Under torchrun the negatives are the views of every rank, gathered with
gradient, and the loss equals the single-process loss on the concatenated batch.

Heads: SimCLR d -> d -> 128 (Linear, BN, ReLU, Linear), d = the trunk's channels (SimCLR's 2048 for
a ResNet-50); SimCLRv2 d -> d -> d -> 128 with batch norm on every layer, whose first layer
(`proj1`: Linear, BN, ReLU) is what SimCLRv2 finetunes from: `ssl extract --layer proj1` and
`ssl finetune --layer proj1` read it.

Options (`--task-option KEY=VALUE`): temperature [0.5: the CIFAR setting; the paper's 0.1 goes with
batches of 4096], projection_dim [128], hidden_dim [the trunk's channels], views [auto] and any view
recipe field (min_scale=0.3, jitter_strength=0.5, blur_prob=0, ...; see `ssl_cli.data.views`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ssl_cli.pretext.contrastive.base import ContrastiveTask, check_number, views_forward
from ssl_cli.pretext.heads import ProjectionMLP
from ssl_cli.pretext.losses.nt_xent import gather_views, nt_xent, nt_xent_accuracy


class SimCLRTask(ContrastiveTask):
    name = "simclr"
    preset = "simclr"
    head_layers = 2  # Linear layers in the projection

    def __init__(self, image_size: int, temperature: float = 0.5, projection_dim: int = 128,
                 hidden_dim: int | None = None, views: str = "auto", **view_options: Any):
        super().__init__(image_size, views, **view_options)
        check_number(self.name, "temperature", temperature, 1e-3, 10)
        check_number(self.name, "projection_dim", projection_dim, 1, 65536, integer=True)
        if hidden_dim is not None:
            check_number(self.name, "hidden_dim", hidden_dim, 1, 65536, integer=True)
        self.temperature, self.projection_dim, self.hidden_dim = float(temperature), projection_dim, hidden_dim

    def options(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "projection_dim": self.projection_dim, "hidden_dim": self.hidden_dim}

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels = trunk_shape[0]
        hidden = self.projection_width(channels, self.hidden_dim)
        dims = [channels] + [hidden] * (self.head_layers - 1) + [self.projection_dim]
        head = nn.Module()
        head.projection = ProjectionMLP(dims, batch_norm=True, last_norm=self.head_layers > 2)
        return head

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[view1, view2], each (B, 3, S, S) -> (z1, z2), each (B, projection_dim)."""
        z1, z2 = views_forward(trunk, head.projection, inputs)
        return z1, z2

    def objective(self, head, output, target, context):
        z1, z2 = (z.float() for z in output)
        gathered = gather_views(z1, z2, context.group)
        return nt_xent(z1, z2, self.temperature, gathered), float(nt_xent_accuracy(z1.detach(), z2.detach(), gathered))


class SimCLRv2Task(SimCLRTask):
    name = "simclr2"
    head_layers = 3

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        head = super().build_head(trunk_shape)
        self.projection_dims = (trunk_shape[0], head.projection.layers[0][0].out_features)
        return head

    def meta(self) -> dict[str, Any]:
        # the head's first block (Linear, BN, ReLU), which `network_from_checkpoint` reads as layer proj1
        d_in, width = self.projection_dims
        return {**super().meta(), "projection": {"d_in": d_in, "width": width, "head_prefix": "projection.layers.0."},
                "feature_layer": "proj1"}  # the trunk's pooled layer of a ResNet ("pool") is not in the projected network
