"""Inpainting with a context encoder (Pathak et al. 2016): reconstruct a region that was blanked out.

Mask policy (`mask`):
- "center" (default): the central square of side S // 2, a quarter of the image, as in
  Pathak's central-region encoder (64 x 64 of 128 x 128);
- "random-block": one square whose side is drawn uniformly from S // 4 .. S // 2 and whose
  position is drawn uniformly inside the image (Pathak's random-block variant pasted several
  smaller blocks; one block keeps the masked area comparable to "center").
Masked input pixels are set to 0, which after ImageNet normalisation is the dataset mean colour
(Pathak filled the hole with the mean too).

Loss: mean squared error over the masked pixels, plus `context_weight` (default 0.001) times
the mean squared error over the visible pixels. The decoder predicts the whole image so one
head fits any trunk map; the small weight keeps its output outside the hole close to the image
(useful when looking at the prediction) without turning the task into autoencoding what the
trunk can see. Pathak predicted only the hole plus a 4 px ring that overlapped the visible
context (weighted 10x, for seamless blending) and added an adversarial loss; neither is done here.
The reconstruction is scored in the normalised space the trunk sees.

inputs (3, S, S) = the masked image; target (4, S, S) = the unmasked normalised image (3
channels) stacked with the mask (1 = hidden), so the loss knows which pixels were hidden.
The head is the upsampling decoder colorization uses, ending in 3 channels at S x S.

On the batch (what training runs; `build_sample` is the per-image definition it is tested against):
the loader delivers the uint8 S x S squares (short side resized to S, centre square kept) and
`batch_transform()` draws every sample's block from the step's generator and masks the whole batch
at once. (`random_crop`, a random square along the long side of a non-square image, applies to
`build_sample` only: the batched path sees the centre square.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssl_cli.errors import UserError
from ssl_cli.pretext.base import PretextTask, TaskBatch, TaskInfo
from ssl_cli.pretext.crops import square_crop, to_normalised_tensor
from ssl_cli.pretext.on_batch import imagenet_normalise, integers, square_images
from ssl_cli.pretext.heads import UpsamplingDecoder

MASKS = ("center", "random-block")


def mask_square(image_size: int, policy: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(top, left, side) of the square to hide in an image_size x image_size image."""
    if policy == "center":
        side = image_size // 2
        return (image_size - side) // 2, (image_size - side) // 2, side
    side = int(rng.integers(image_size // 4, image_size // 2 + 1))
    top, left = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
    return top, left, side


class InpaintingTask(PretextTask):
    """inputs (3, S, S) masked image; target (4, S, S) = original normalised image + mask."""

    name = "inpainting"
    min_image_size = 8  # the smallest random block (S // 4) is still 2 px

    def __init__(self, image_size: int, mask: str = "center", context_weight: float = 0.001,
                 random_crop: bool = True):
        super().__init__(image_size)
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < self.min_image_size:
            raise UserError(f"inpainting: image_size must be an integer >= {self.min_image_size}, got {image_size!r}")
        if mask not in MASKS:
            raise UserError(f"inpainting: unknown mask {mask!r}; valid masks: {', '.join(MASKS)}")
        if (not isinstance(context_weight, (int, float)) or isinstance(context_weight, bool)
                or not math.isfinite(context_weight) or context_weight < 0):
            raise UserError(f"inpainting: context_weight must be a number >= 0, got {context_weight!r}")
        if not isinstance(random_crop, bool):
            raise UserError(f"inpainting: random_crop must be true or false, got {random_crop!r}")
        self.mask, self.context_weight, self.random_crop = mask, float(context_weight), random_crop

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, {"mask": self.mask, "context_weight": self.context_weight,
                                    "random_crop": self.random_crop})

    def build_sample(self, image: Image.Image, rng: np.random.Generator,
                     other: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = to_normalised_tensor(square_crop(image, self.image_size, rng, self.random_crop))
        top, left, side = mask_square(self.image_size, self.mask, rng)
        hidden = torch.zeros(1, self.image_size, self.image_size)
        hidden[:, top:top + side, left:left + side] = 1.0
        return pixels * (1.0 - hidden), torch.cat([pixels, hidden])

    # --- on the batch (what training runs) ----------------------------------------------------------

    def dataset(self, source, seed: int):
        return square_images(source, self.image_size)

    def batch_transform(self):
        def masked(images: torch.Tensor, generator: torch.Generator) -> TaskBatch:
            return self.batch_sample(images, self.draw(len(images), generator))

        return masked

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B, 3) int64 (top, left, side) of every sample's hidden square, as `mask_square` draws them."""
        size = self.image_size
        if self.mask == "center":
            side = size // 2
            return torch.tensor([(size - side) // 2, (size - side) // 2, side], device=generator.device).repeat(batch, 1)
        side = size // 4 + integers(size // 2 - size // 4 + 1, (batch, 1), generator)
        corner = integers(size - side + 1, (batch, 2), generator)
        return torch.cat([corner, side], dim=1)

    def batch_sample(self, images: torch.Tensor, squares: torch.Tensor) -> TaskBatch:
        """uint8 (B, 3, S, S), squares (B, 3) -> TaskBatch((B, 3, S, S) masked images, (B, 4, S, S) targets)."""
        pixels = imagenet_normalise(images)
        steps = torch.arange(self.image_size, device=images.device)
        top, left, side = (squares[:, i].view(-1, 1) for i in range(3))
        rows = (steps >= top) & (steps < top + side)  # (B, S)
        columns = (steps >= left) & (steps < left + side)
        hidden = (rows[:, :, None] & columns[:, None, :]).unsqueeze(1).to(pixels.dtype)  # (B, 1, S, S)
        return TaskBatch(pixels * (1.0 - hidden), torch.cat([pixels, hidden], dim=1))

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels, height, _ = trunk_shape
        return UpsamplingDecoder(channels, height, 3, self.image_size)

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) masked images -> (B, 3, S, S) reconstructions."""
        return head(trunk(inputs))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE over hidden pixels + context_weight x MSE over visible ones (both per pixel and channel)."""
        image, hidden = target[:, :3], target[:, 3:]
        squared = (output - image).pow(2)
        channels = squared.shape[1]
        hole = (squared * hidden).sum() / (hidden.sum() * channels).clamp(min=1.0)
        visible = 1.0 - hidden
        context = (squared * visible).sum() / (visible.sum() * channels).clamp(min=1.0)
        return hole + self.context_weight * context
