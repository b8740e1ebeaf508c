"""MoCo (He et al. 2020) and MoCo v2 (Chen et al. 2020c): a query encoder trained by InfoNCE against a
momentum key encoder and a queue of earlier keys (`ssl_cli.pretext.losses.info_nce`).

inputs: two views (B, 3, S, S); the query encoder (the backbone's trunk + projection) maps view 1 to
q, the key encoder (a momentum copy of both, no gradient) maps view 2 to k; the loss is InfoNCE of q
against k and the K keys in the queue; then the batch's keys (every rank's) enter the queue, and after
the optimizer step the key encoder moves towards the query encoder: theta_k = m theta_k + (1 - m) theta_q.
Key encoder, queue and queue pointer are buffers of the head, so the checkpoint holds them and a
resumed run continues exactly.

Shuffled batch norm: batch norm inside one batch lets a query and its key share statistics, a
shortcut MoCo closes by computing keys on a batch shuffled across GPUs. Under torchrun the keys are
computed that way (views gathered from every rank, one permutation drawn identically on all ranks,
each rank encodes its slice, keys gathered and un-shuffled). In one process a permuted batch is
still one batch, so the stand-in is MoCo's own CIFAR demo's: the key batch is shuffled and
encoded in `bn_splits` chunks, each normalised with its own statistics, as if on as many GPUs.

Settings: v1 a linear head to 128 and temperature 0.07; v2 an MLP head (d -> d -> 128, the paper's
2048 is its trunk's width), blur in the views, temperature 0.2. Queue K = 65,536 as in the papers,
capped at the dataset size (a key in the queue twice is a negative against itself; the cap is
reported in the checkpoint's task options). Momentum m = 0.99 by default: the papers' 0.999 is for
ImageNet's 5,000 steps an epoch; at the few thousand steps of a small-image run, a key encoder that
slow still carries its initial weights (MoCo's CIFAR demo uses 0.99 too).

Options: temperature, momentum, queue_size, projection_dim [128], hidden_dim (v2) [trunk channels],
bn_splits [auto: batch / 64, 1..8], views [auto] and any view recipe field.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ssl_cli.pretext.contrastive.base import ContrastiveTask, check_number
from ssl_cli.pretext.heads import ProjectionMLP, global_pool
from ssl_cli.pretext.losses.info_nce import info_nce
from ssl_cli.pretext.memory import FeatureQueue, copy_for_momentum, momentum_update
from ssl_cli.train import distributed
from ssl_cli.train.distributed import all_gather_no_grad

PAPER_QUEUE = 65_536


class MoCoTask(ContrastiveTask):
    name = "moco"
    preset = "moco2"
    mlp_head = False

    def __init__(self, image_size: int, temperature: float | None = None, momentum: float = 0.99,
                 queue_size: int = PAPER_QUEUE, projection_dim: int = 128, hidden_dim: int | None = None,
                 bn_splits: int | None = None, views: str = "auto", **view_options: Any):
        if not self.mlp_head and views == "auto":  # v1's views: jitter 0.4 everywhere incl. hue, always; no blur
            view_options = {"blur_prob": 0.0, "jitter_prob": 1.0, "hue": 0.4, **view_options}
        super().__init__(image_size, views, **view_options)
        temperature = temperature if temperature is not None else (0.2 if self.mlp_head else 0.07)
        check_number(self.name, "temperature", temperature, 1e-3, 10)
        check_number(self.name, "momentum", momentum, 0.0, 1.0)
        check_number(self.name, "queue_size", queue_size, 1, 10_000_000, integer=True)
        check_number(self.name, "projection_dim", projection_dim, 1, 65536, integer=True)
        if hidden_dim is not None:
            check_number(self.name, "hidden_dim", hidden_dim, 1, 65536, integer=True)
        if bn_splits is not None:
            check_number(self.name, "bn_splits", bn_splits, 1, 1024, integer=True)
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.queue_size, self.projection_dim, self.hidden_dim, self.bn_splits = \
            queue_size, projection_dim, hidden_dim, bn_splits
        self.size_of_dataset: int | None = None

    def options(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "momentum": self.momentum, "queue_size": self.queue_size,
                "projection_dim": self.projection_dim, "hidden_dim": self.hidden_dim, "bn_splits": self.bn_splits}

    def queue_length(self) -> int:
        """K, capped at the dataset size when the dataset is known."""
        return min(self.queue_size, self.size_of_dataset) if self.size_of_dataset else self.queue_size

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "queue_length": self.queue_length()}

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels = trunk_shape[0]
        dims = [channels, self.projection_width(channels, self.hidden_dim), self.projection_dim] if self.mlp_head \
            else [channels, self.projection_dim]
        head = nn.Module()
        head.projection = ProjectionMLP(dims, batch_norm=False)  # MoCo's heads have no batch norm
        head.queue = FeatureQueue(self.queue_length(), self.projection_dim)
        head.register_buffer("steps", torch.zeros((), dtype=torch.long))  # seeds the key shuffle; resumes with it
        return head

    def attach(self, network) -> None:
        """The key encoder: momentum copies of the backbone and the projection, in the head."""
        network.head.key_backbone = copy_for_momentum(network.backbone)
        network.head.key_projection = copy_for_momentum(network.head.projection)

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[view1, view2] (B, 3, S, S) each -> (q, k), each (B, projection_dim); k has no gradient."""
        from ssl_cli.pretext.base import trunk_forward

        query = head.projection(global_pool(trunk(inputs[0])))
        with torch.no_grad():
            def encode(images: torch.Tensor) -> torch.Tensor:
                return head.key_projection(global_pool(trunk_forward(head.key_backbone, images)))

            key = shuffled_keys(encode, inputs[1], self.splits(len(inputs[1])), distributed.current_group(),
                                int(head.steps))
        return query, key

    def splits(self, batch: int) -> int:
        return self.bn_splits if self.bn_splits is not None else max(1, min(8, batch // 64))

    def objective(self, head, output, target, context):
        query, key = (z.float() for z in output)
        loss, accuracy = info_nce(query, key, head.queue.queue, self.temperature)
        head.queue.enqueue(all_gather_no_grad(key, context.group))
        return loss, float(accuracy)

    def after_step(self, network, context) -> None:
        network.head.steps += 1
        momentum_update(network.backbone, network.head.key_backbone, self.momentum)
        momentum_update(network.head.projection, network.head.key_projection, self.momentum)


class MoCoV2Task(MoCoTask):
    name = "moco2"
    mlp_head = True


def shuffled_keys(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, splits: int,
                  group: distributed.ProcessGroup, seed: int) -> torch.Tensor:
    """Keys (B, D) of images (B, 3, S, S), computed on a shuffled batch (see the module docstring).

    The permutation comes from a generator seeded by `seed` (the step count, a buffer of the head:
    the same on every rank and after a resume)."""
    generator = torch.Generator().manual_seed(seed)
    if group.active:
        every = all_gather_no_grad(images, group)
        order = torch.randperm(len(every), generator=generator).to(images.device)
        mine = order.view(group.world, -1)[group.rank]
        keys = all_gather_no_grad(encode(every[mine]), group)
        restored = torch.empty_like(keys)
        restored[order] = keys
        return restored.view(group.world, len(images), -1)[group.rank]
    order = torch.randperm(len(images), generator=generator).to(images.device)
    keys = torch.cat([encode(chunk) for chunk in images[order].chunk(splits)])
    restored = torch.empty_like(keys)
    restored[order] = keys
    return restored
