"""SwAV (Caron et al. 2020): predict the cluster code of one view of an image from another view.

Views (multi-crop, made on the device from the contrastive view recipe, `ssl_cli.data.views`):
`large` crops at the training size S (SwAV's 2 x 224 with area 0.14-1; the grey and CIFAR presets keep
their own smallest scale) and `small` crops of area `small_min_scale`-`small_max_scale` (0.05-0.14)
resized to round(S x 96 / 224) px (96 px at 224), raised to the smallest input the trunk accepts.

Each view goes through trunk, global pool and the projection MLP (d -> hidden -> 128, BN and ReLU
between) to z, L2-normalised; its scores against K prototypes (a bias-free Linear(128, K) whose rows
are renormalised to unit length after every step) are z . c_k. For each of the two large crops, the
codes are the online Sinkhorn-Knopp of its scores over the batch (epsilon 0.05, 3 iterations,
no gradient; summed over ranks under torchrun, `ssl_cli.pretext.losses.sinkhorn`), and every other
view predicts them from its own scores with a softmax at temperature 0.1: the swapped prediction of
`ssl_cli.pretext.losses.swav`.

Small batches: with `queue_length` > 0, from epoch `queue_start` (counting from 1) on, the projections
of the two large crops of past batches are kept in a queue (one per crop, newest first), and once it
is full their scores are put before the batch's when the codes are computed (only the batch's codes
are used), as SwAV does below 256 images a batch. The queue is a buffer of the head, so resume keeps it; under
torchrun DDP broadcasts buffers from rank 0, so every rank adds the gathered batch of all ranks to the
queue, and each rank's Sinkhorn then counts the shared queue once per rank (a heavier weight on the
queue than one process would give; the codes of the batch stay balanced).

The prototypes get no update during the first `freeze_prototypes` epochs (1 in the paper): their
scores are computed with a gradient scaled to zero, so every parameter still takes part in the loss
(as DDP needs) and the prototypes stay where they were (renormalised after each step).

Options (`--task-option KEY=VALUE`): prototypes [3000], temperature [0.1], epsilon [0.05],
sinkhorn_iterations [3], large [2], small [6], small_min_scale [0.05], small_max_scale [0.14],
small_size [round(S x 96 / 224)], queue_length [0: off; the paper's 3840 with batches of 256],
queue_start [15], freeze_prototypes [1 epoch], projection_dim [128], hidden_dim [the trunk's
channels], views [auto] and any view recipe field.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from ssl_cli.data.views import make_views
from ssl_cli.pretext.base import minimum_trunk_input
from ssl_cli.pretext.contrastive.base import ContrastiveTask, check_number
from ssl_cli.pretext.heads import ProjectionMLP, global_pool
from ssl_cli.pretext.losses.sinkhorn import sinkhorn
from ssl_cli.pretext.losses.swav import swapped_prediction
from ssl_cli.train.distributed import all_gather_no_grad

SMALL_CROP_FRACTION = 96 / 224  # SwAV's small crops: 96 px where the large ones are 224 px


class SwAVTask(ContrastiveTask):
    name = "swav"
    family = "clustering"
    preset = "simclr"

    def __init__(self, image_size: int, prototypes: int = 3000, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, large: int = 2, small: int = 6, small_min_scale: float = 0.05,
                 small_max_scale: float = 0.14, small_size: int | None = None, queue_length: int = 0,
                 queue_start: int = 15, freeze_prototypes: int = 1, projection_dim: int = 128,
                 hidden_dim: int | None = None, views: str = "auto", **view_options: Any):
        super().__init__(image_size, views, **view_options)
        check_number(self.name, "prototypes", prototypes, 2, 1_000_000, integer=True)
        check_number(self.name, "temperature", temperature, 1e-3, 10)
        check_number(self.name, "epsilon", epsilon, 1e-4, 10)
        check_number(self.name, "sinkhorn_iterations", sinkhorn_iterations, 1, 1000, integer=True)
        check_number(self.name, "large", large, 2, 2, integer=True)
        check_number(self.name, "small", small, 0, 64, integer=True)
        check_number(self.name, "small_min_scale", small_min_scale, 0.01, 1.0)
        check_number(self.name, "small_max_scale", small_max_scale, small_min_scale, 1.0)
        if small_size is not None:
            check_number(self.name, "small_size", small_size, 4, image_size, integer=True)
        check_number(self.name, "queue_length", queue_length, 0, 10_000_000, integer=True)
        check_number(self.name, "queue_start", queue_start, 1, 100_000, integer=True)
        check_number(self.name, "freeze_prototypes", freeze_prototypes, 0, 100_000, integer=True)
        check_number(self.name, "projection_dim", projection_dim, 1, 65536, integer=True)
        if hidden_dim is not None:
            check_number(self.name, "hidden_dim", hidden_dim, 1, 65536, integer=True)
        self.prototypes, self.temperature, self.epsilon = prototypes, float(temperature), float(epsilon)
        self.sinkhorn_iterations, self.large, self.small = sinkhorn_iterations, large, small
        self.small_min_scale, self.small_max_scale = float(small_min_scale), float(small_max_scale)
        self.small_size = small_size or max(4, round(image_size * SMALL_CROP_FRACTION))
        self.queue_length, self.queue_start, self.freeze_prototypes = queue_length, queue_start, freeze_prototypes
        self.projection_dim, self.hidden_dim = projection_dim, hidden_dim
        self.frozen = False  # the prototypes this epoch; set by epoch_start

    def options(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes, "temperature": self.temperature, "epsilon": self.epsilon,
                "sinkhorn_iterations": self.sinkhorn_iterations, "large": self.large, "small": self.small,
                "small_min_scale": self.small_min_scale, "small_max_scale": self.small_max_scale,
                "small_size": self.small_size, "queue_length": self.queue_length, "queue_start": self.queue_start,
                "freeze_prototypes": self.freeze_prototypes, "projection_dim": self.projection_dim,
                "hidden_dim": self.hidden_dim}

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "small_crop_input": self.small_size}

    # --- views ------------------------------------------------------------------------------------

    def batch_transform(self):
        recipe = self.recipe
        if recipe is None:
            raise RuntimeError(f"{self.name}: dataset() decides the view recipe; call it before batch_transform()")
        small_recipe = replace(recipe, min_scale=self.small_min_scale, max_scale=self.small_max_scale)
        large, small, size = self.large, self.small, self.small_size

        def multi_crop(images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
            views = make_views(images, recipe, generator, count=large)
            if small:
                crops = make_views(images, small_recipe, generator, count=small)
                views += [F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)
                          for crop in crops]
            return views

        return multi_crop

    # --- network ----------------------------------------------------------------------------------

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels = trunk_shape[0]
        hidden = self.projection_width(channels, self.hidden_dim)
        head = nn.Module()
        head.projection = ProjectionMLP([channels, hidden, self.projection_dim], batch_norm=True)
        head.prototypes = nn.Linear(self.projection_dim, self.prototypes, bias=False)
        with torch.no_grad():
            head.prototypes.weight.copy_(F.normalize(head.prototypes.weight, dim=1))
        if self.queue_length:
            head.register_buffer("queue", torch.zeros(self.large, self.queue_length, self.projection_dim))
            head.register_buffer("queue_filled", torch.zeros((), dtype=torch.int64))
        return head

    def attach(self, network) -> None:
        smallest = minimum_trunk_input(network.backbone)
        if self.small and self.small_size < smallest:
            self.small_size = smallest  # the trunk cannot see smaller crops

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """[large crops (B, 3, S, S) ..., small crops (B, 3, s, s) ...] -> (z per view (B, D) unit rows,
        scores per view (B, K)); views of one size go through the trunk as one batch."""
        batch = inputs[0].shape[0]
        z: list[torch.Tensor] = []
        for group in (inputs[: self.large], inputs[self.large:]):
            if group:
                z += list(F.normalize(head.projection(global_pool(trunk(torch.cat(group)))), dim=1).split(batch))
        weight = head.prototypes.weight
        if self.frozen:
            weight = weight.detach() + (weight - weight.detach()) * 0.0  # in the graph, gradient zero
        return z, [view @ weight.T for view in z]

    def epoch_start(self, network, epoch: int, optimizer) -> None:
        self.frozen = epoch < self.freeze_prototypes
        return None

    def objective(self, head, output, target, context):
        z, scores = output
        scores = [s.float() for s in scores]
        batch = scores[0].shape[0]
        queue_on = self.queue_length and context.epoch + 1 >= self.queue_start  # an empty queue at queue_start
        use_queue = queue_on and int(head.queue_filled) >= self.queue_length
        codes = []
        with torch.no_grad():
            for crop in range(self.large):
                crop_scores = scores[crop].detach()
                if use_queue:
                    queued = head.queue[crop] @ head.prototypes.weight.T.float()
                    crop_scores = torch.cat([queued, crop_scores])
                codes.append(sinkhorn(crop_scores, self.epsilon, self.sinkhorn_iterations, context.group)[-batch:])
            if queue_on:
                self.push(head, [all_gather_no_grad(z[crop].detach().float(), context.group) for crop in range(self.large)])
        loss = swapped_prediction(scores, codes, self.temperature)
        agree = (codes[0].argmax(1) == scores[1].detach().argmax(1)).float().mean().item()
        return loss, agree

    def push(self, head: nn.Module, rows: list[torch.Tensor]) -> None:
        """Newest rows first: queue[c] = [rows[c]; queue[c][: L - b]] for each large crop c."""
        length = self.queue_length
        for crop, new in enumerate(rows):
            new = new[:length]
            head.queue[crop] = torch.cat([new, head.queue[crop][: length - len(new)]])
        head.queue_filled.fill_(min(length, int(head.queue_filled) + len(rows[0])))

    def after_step(self, network, context) -> None:
        with torch.no_grad():
            weight = network.head.prototypes.weight
            weight.copy_(F.normalize(weight, dim=1))

