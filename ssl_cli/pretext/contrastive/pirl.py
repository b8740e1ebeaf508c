"""PIRL (Misra & van der Maaten 2020): the representation of an image should not change when the
image is cut into a jigsaw puzzle, and should differ from other images'.

A sample is the image (uint8 (3, S, S), augmented on the device like SimCLR's views) and its jigsaw
transform: the handcrafted jigsaw task's tiling (`batch_tiles`, on the batch: the image resized on the
device to round(jigsaw_size * 256 / 225) px, a random jigsaw_size crop, a 3 x 3 grid of cells, a tile
at a random place in each; 9 tiles (9, 3, t, t)), shuffled by a random permutation of all 9!. f(v_I):
the trunk's pooled map of the image, projected to 128-d. g(v_It): every tile through the same
trunk (resized up to the smallest input the trunk accepts), pooled, projected to 128-d each,
concatenated in their shuffled order and projected to 128-d. A memory bank holds one 128-d row per
image, m_I = normalise(0.5 m_I + 0.5 f(v_I)) after each step, and the loss is the two-term NCE
(`ssl_cli.pretext.losses.nce_bank`): lambda = 0.5, temperature 0.07, negatives drawn from the bank.

The trunk's batch norm normalises tiles by their own batch but only images update its running
statistics (`running_stats_frozen`), so that eval mode sees image statistics.

Settings: the paper's 32,000 negatives, capped at the dataset size - 1. The NCE normaliser Z is
fixed on the first batch as |D| x the mean exp(s/T) of its pairs (the released implementation, after
Wu et al. 2018; without it, at T = 0.07 the sum over thousands of negatives starts in the tens of
thousands); it is a buffer, so resume keeps it. Bank and Z are in the checkpoint.

Options: temperature [0.07], negatives [32000], bank_momentum [0.5], weight (lambda) [0.5],
projection_dim [128], jigsaw_size (crop the tiles are cut from) [max(image size, 30)], loss [nce: the
paper's; infonce: the softmax cross entropy over the positive and the drawn negatives, which needs no
Z], views [auto] and any view recipe field.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ssl_cli.data.views import make_views
from ssl_cli.errors import UserError
from ssl_cli.pretext.base import minimum_trunk_input
from ssl_cli.pretext.contrastive.base import ContrastiveTask, check_number
from ssl_cli.pretext.handcrafted.jigsaw import (PAPER_CROP, PAPER_RESIZE, batch_tiles, default_tile_size,
                                                minimum_image_size, resize_to)
from ssl_cli.pretext.heads import global_pool
from ssl_cli.pretext.losses.nce_bank import PIRL_WEIGHT, nce_bank
from ssl_cli.pretext.memory import MemoryBank
from ssl_cli.train.distributed import all_gather_no_grad, all_reduce_sum

GRID = 3
PAPER_NEGATIVES = 32_000


class PIRLTask(ContrastiveTask):
    name = "pirl"
    preset = "simclr"

    def __init__(self, image_size: int, temperature: float = 0.07, negatives: int = PAPER_NEGATIVES,
                 bank_momentum: float = 0.5, weight: float = PIRL_WEIGHT, projection_dim: int = 128,
                 jigsaw_size: int | None = None, loss: str = "nce", views: str = "auto", **view_options: Any):
        super().__init__(image_size, views, **view_options)
        check_number(self.name, "temperature", temperature, 1e-3, 10)
        check_number(self.name, "negatives", negatives, 1, 10_000_000, integer=True)
        check_number(self.name, "bank_momentum", bank_momentum, 0.0, 1.0)
        check_number(self.name, "weight", weight, 0.0, 1.0)
        check_number(self.name, "projection_dim", projection_dim, 1, 65536, integer=True)
        if loss not in ("nce", "infonce"):
            raise UserError(f"{self.name}: loss must be nce or infonce, got {loss!r}")
        self.loss_kind = loss
        smallest = minimum_image_size(GRID, None)
        jigsaw_size = jigsaw_size if jigsaw_size is not None else max(image_size, smallest)
        check_number(self.name, "jigsaw_size", jigsaw_size, smallest, 4096, integer=True)
        self.temperature, self.negatives, self.bank_momentum, self.weight = \
            float(temperature), negatives, float(bank_momentum), float(weight)
        self.projection_dim, self.jigsaw_size = projection_dim, jigsaw_size
        self.tile_px = default_tile_size(jigsaw_size // GRID)
        self.tile_input = self.tile_px  # raised in attach() to what the trunk accepts
        self.size_of_dataset: int | None = None

    def options(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "negatives": self.negatives, "bank_momentum": self.bank_momentum,
                "weight": self.weight, "projection_dim": self.projection_dim, "jigsaw_size": self.jigsaw_size,
                "loss": self.loss_kind}

    def negatives_drawn(self) -> int:
        return min(self.negatives, self.size_of_dataset - 1) if self.size_of_dataset else self.negatives

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "negatives_drawn": self.negatives_drawn(), "tile_input": self.tile_input}

    # --- data: whole images (`WholeImages`, in memory when they fit); the view and the tiles on the device ---

    def batch_transform(self):
        recipe = self.recipe
        if recipe is None:
            raise RuntimeError(f"{self.name}: dataset() decides the view recipe; call it before batch_transform()")
        base = round(self.jigsaw_size * PAPER_RESIZE / PAPER_CROP)

        def transform(images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
            """uint8 (B, 3, S, S) -> [view (B, 3, S, S), tiles (B, 9, 3, t, t) in a random order]."""
            view = make_views(images, recipe, generator, count=1)[0]
            order = torch.rand(len(images), GRID * GRID, generator=generator, device=generator.device).argsort(dim=1)
            return [view, batch_tiles(resize_to(images, base), self.jigsaw_size, GRID, self.tile_px, generator, order)]

        return transform

    # --- network ----------------------------------------------------------------------------------

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels, d = trunk_shape[0], self.projection_dim
        head = nn.Module()
        head.image_projection = nn.Linear(channels, d)  # f
        head.tile_projection = nn.Linear(channels, d)  # g, per tile ...
        head.puzzle_projection = nn.Linear(GRID * GRID * d, d)  # ... then over the 9 concatenated
        head.bank = MemoryBank(self.size_of_dataset or 1, d)
        head.register_buffer("partition", torch.zeros(()))  # Z; 0 until the first batch fixes it
        return head

    def attach(self, network) -> None:
        self.tile_input = max(self.tile_px, minimum_trunk_input(network.backbone))

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[image (B, 3, S, S), tiles (B, 9, 3, t, t)] -> (f(v_I), g(v_It)), each (B, projection_dim)."""
        images, tiles = inputs
        batch = len(images)
        image_features = head.image_projection(global_pool(trunk(images)))
        tiles = tiles.flatten(0, 1)
        if self.tile_input != tiles.shape[-1]:
            tiles = F.interpolate(tiles, size=self.tile_input, mode="bilinear", align_corners=False)
        with running_stats_frozen(trunk):  # the BN statistics extract and the monitor use are the images'
            per_tile = head.tile_projection(global_pool(trunk(tiles)))  # (B * 9, d)
        return image_features, head.puzzle_projection(per_tile.reshape(batch, -1))

    def objective(self, head, output, target, context):
        image_features, transformed = (z.float() for z in output)
        bank: MemoryBank = head.bank
        generator = torch.Generator(device=bank.bank.device).manual_seed(context.step * 1_000_003 + context.group.rank)
        negatives = bank.sample_negatives(context.indices, self.negatives_drawn(), generator)
        if float(head.partition) == 0.0:  # every rank's first batch, averaged: one Z everywhere
            z = torch.tensor(first_batch_partition(image_features.detach(), bank.bank, context.indices, negatives,
                                                   self.temperature), device=head.partition.device)
            head.partition.fill_(float(all_reduce_sum(z, context.group)) / context.group.world)
        loss = nce_bank(image_features, transformed, bank.bank, context.indices, negatives, self.temperature,
                        self.weight, float(head.partition), self.loss_kind)
        with torch.no_grad():
            bank.update(all_gather_no_grad(context.indices, context.group),
                        all_gather_no_grad(image_features, context.group), self.bank_momentum)
        return loss, None


@contextmanager
def running_stats_frozen(trunk: Callable) -> Iterator[None]:
    """Batch norm inside normalises by the batch as usual but leaves its running statistics alone.

    The tiles (9 upsampled cells per image) have other statistics than whole images; if they entered
    the running mean and variance, eval mode (`ssl extract`, the monitor) would normalise images with a
    blend of both and the features would lose much of what training gave them."""
    module = getattr(trunk, "__self__", trunk)  # the bound PretextNetwork.trunk -> the network
    norms = [layer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    saved = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, momentum in zip(norms, saved):
            layer.momentum = momentum


def first_batch_partition(features: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, negatives: torch.Tensor,
                          temperature: float) -> float:
    """Z = |D| x mean exp(s/T) over the batch's positive and negative pairs (features (B, D), bank (|D|, D))."""
    features, bank = F.normalize(features, dim=1), F.normalize(bank, dim=1)
    similarity = torch.cat([(features * bank[indices]).sum(1, keepdim=True),
                            torch.gather(features @ bank.T, 1, negatives)], dim=1)
    return float(len(bank) * (similarity / temperature).exp().mean())
