"""Rotation prediction (Gidaris, Singh & Komodakis 2018): which of 4 rotations was applied?

A sample is the image rotated by k x 90 degrees (counter-clockwise), k drawn uniformly from
0..3, and the label is k. Recognising "which way is up" needs the objects' shape, pose and
location, so the trunk has to learn them.

Gidaris et al. put all 4 rotations of an image in the same batch; here each sample draws one
rotation, so every rotation of every image is seen equally often in expectation and the
DataLoader stays one-sample-per-index like every other task.

On the batch (what training runs; `build_sample` is the per-image definition it is tested against):
the loader delivers the uint8 S x S squares (short side resized to S, centre square kept) and
`batch_transform()` draws every sample's k from the step's generator and rotates each group of equal
k with one `torch.rot90`. (`random_crop`, a random square along the long side of a non-square image,
applies to `build_sample` only: the batched path sees the centre square.)

Head: global average pool of the trunk map -> Linear(C, 4). It is deliberately weak so that the
trunk, not the head, does the work (Gidaris et al. found the later conv blocks specialise to the
task; a linear head keeps that specialisation inside the backbone that `ssl extract` reads).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssl_cli.errors import UserError
from ssl_cli.pretext.base import ClassificationTask, TaskBatch, TaskInfo
from ssl_cli.pretext.crops import square_crop, to_normalised_tensor
from ssl_cli.pretext.on_batch import imagenet_normalise, integers, square_images

ROTATIONS = 4


def rotate(images: torch.Tensor, k: int) -> torch.Tensor:
    """(..., H, W) -> same, rotated counter-clockwise by k x 90 degrees (k may be negative)."""
    return torch.rot90(images, k, dims=(-2, -1))


class RotationHead(nn.Module):
    """(B, C, h, w) trunk map -> (B, 4) logits: global average pool, then one linear layer."""

    def __init__(self, channels: int):
        super().__init__()
        self.classifier = nn.Linear(channels, ROTATIONS)

    def forward(self, trunk_map: torch.Tensor) -> torch.Tensor:
        # A mean, not nn.AdaptiveAvgPool2d: its CUDA backward refuses deterministic mode.
        return self.classifier(trunk_map.mean(dim=(2, 3)))


class RotationTask(ClassificationTask):
    """inputs (3, S, S) = the image rotated by k x 90 degrees; target () int64 = k in 0..3."""

    name = "rotation"
    min_image_size = 8  # below this the lowres trunks have no spatial map left to pool

    def __init__(self, image_size: int, random_crop: bool = True):
        super().__init__(image_size)
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < self.min_image_size:
            raise UserError(f"rotation: image_size must be an integer >= {self.min_image_size}, got {image_size!r}")
        if not isinstance(random_crop, bool):
            raise UserError(f"rotation: random_crop must be true or false, got {random_crop!r}")
        self.random_crop = random_crop

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, {"random_crop": self.random_crop})

    def classes(self) -> int:
        return ROTATIONS

    def build_sample(self, image: Image.Image, rng: np.random.Generator,
                     other: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = to_normalised_tensor(square_crop(image, self.image_size, rng, self.random_crop))
        k = int(rng.integers(ROTATIONS))
        return rotate(pixels, k).contiguous(), torch.tensor(k, dtype=torch.int64)

    # --- on the batch (what training runs) ----------------------------------------------------------

    def dataset(self, source, seed: int):
        return square_images(source, self.image_size)

    def batch_transform(self):
        def rotated(images: torch.Tensor, generator: torch.Generator) -> TaskBatch:
            return self.batch_sample(images, integers(ROTATIONS, (len(images),), generator))

        return rotated

    def batch_sample(self, images: torch.Tensor, ks: torch.Tensor) -> TaskBatch:
        """uint8 (B, 3, S, S), ks (B,) in 0..3 -> TaskBatch((B, 3, S, S) image b rotated by ks[b] x 90 degrees
        counter-clockwise, ks)."""
        pixels = imagenet_normalise(images)
        out = torch.empty_like(pixels)
        for k in range(ROTATIONS):
            chosen = (ks == k).nonzero().squeeze(1)
            out[chosen] = rotate(pixels[chosen], k)
        return TaskBatch(out, ks)

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        return RotationHead(trunk_shape[0])

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 4) logits."""
        return head(trunk(inputs))

