"""Colorization (Zhang, Isola & Efros 2016): predict an image's colours from its lightness.

The trunk sees only the CIE Lab lightness L (scaled to [-1, 1], repeated to 3 channels so any
RGB arch takes it) and predicts, per output pixel, a CLASS over quantised ab colour values
rather than regressing ab: colour is multimodal (a shirt may be red or blue) and a regression
loss averages the modes into grey, which classification avoids. This is Zhang et al.'s choice.

Quantisation: a regular grid of `bins` x `bins` cells over a, b in [-110, 110] (default 16, so
cells of 13.75), class = a_bin * bins + b_bin. Zhang et al. used cells of 10 and kept only the
313 that are in the sRGB gamut; a full grid needs no gamut table (out-of-gamut classes are
simply never targets, and the head learns to give them low scores), keeps the class index a
closed-form function of ab, and at the default 16 bins has a similar 256 classes.

Also unlike Zhang et al.: targets are hard (the class of the area-averaged ab of each
`output_stride` x `output_stride` block) instead of soft-encoded over 5 nearest bins, and the
loss is not class-rebalanced; both keep the task a plain per-pixel cross-entropy.

The head is a small decoder: 1x1 conv to `DECODER_WIDTH` channels, learned x2 up-convolutions
until the map is about the target size, a 3x3 conv to bins^2 logits, then an exact bilinear
resize to (S / output_stride)^2 so any trunk map size works.

On the batch (what training runs; `build_sample` is the per-image definition it is tested against):
the loader delivers the uint8 S x S squares (short side resized to S, centre square kept) and
`batch_transform()` converts the whole batch to Lab in torch (`data.colour.rgb_to_lab_batch`, float64
like the numpy definition), takes the lightness input and area-downsamples and quantises ab with the
same arithmetic. No draw is random: a square image has one S x S square, so the sample does not
depend on the step's generator. (`random_crop`, a random square along the long side of a non-square
image, applies to `build_sample` only: the batched path sees the centre square, as rotation's and
inpainting's do.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ssl_cli.data.colour import lightness_input, rgb_to_lab, rgb_to_lab_batch
from ssl_cli.data.resized import first_images, is_grey
from ssl_cli.errors import UserError
from ssl_cli.pretext.base import PretextTask, TaskBatch, TaskInfo
from ssl_cli.pretext.crops import square_crop
from ssl_cli.pretext.heads import UpsamplingDecoder
from ssl_cli.pretext.on_batch import square_images

if TYPE_CHECKING:
    from ssl_cli.data.sources import ImageSource

AB_RANGE = 110.0  # sRGB colours have a in [-86.2, 98.2] and b in [-107.9, 94.5]
MAX_BINS = 64  # 4096 classes with cells of 3.4 ab units; finer grids only inflate the logits

def quantise_ab(ab: np.ndarray, bins: int = 16) -> np.ndarray:
    """(..., 2) ab values -> (...) int64 classes a_bin * bins + b_bin on a bins x bins grid over [-110, 110]."""
    width = 2 * AB_RANGE / bins
    index = np.clip(np.floor((np.asarray(ab) + AB_RANGE) / width), 0, bins - 1).astype(np.int64)
    return index[..., 0] * bins + index[..., 1]


def quantise_ab_map(ab: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """(..., 2, h, w) ab values -> (..., h, w) int64 classes: `quantise_ab` channel-first, in torch."""
    width = 2 * AB_RANGE / bins
    index = torch.floor((ab + AB_RANGE) / width).clamp_(0, bins - 1).long()
    return index[..., 0, :, :] * bins + index[..., 1, :, :]


def class_centres(bins: int = 16) -> np.ndarray:
    """(bins^2, 2) float64: the (a, b) at the centre of each class's cell, indexed like `quantise_ab`."""
    width = 2 * AB_RANGE / bins
    centres = -AB_RANGE + (np.arange(bins) + 0.5) * width
    a, b = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([a.ravel(), b.ravel()], axis=-1)


class ColorizationTask(PretextTask):
    """inputs (3, S, S) = L in [-1, 1] three times; target (S/f, S/f) int64 ab classes, f = output_stride."""

    name = "colorization"
    input_mode = "lightness"
    min_image_size = 8

    def __init__(self, image_size: int, bins: int = 16, output_stride: int = 4, random_crop: bool = True):
        super().__init__(image_size)
        for option, value, minimum, maximum in (("image_size", image_size, self.min_image_size, None),
                                                ("bins", bins, 2, MAX_BINS), ("output_stride", output_stride, 1, None)):
            if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
                    or (maximum is not None and value > maximum)):
                limits = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
                raise UserError(f"colorization: {option} must be an integer {limits}, got {value!r}")
        if image_size % output_stride:
            raise UserError(f"colorization: image_size {image_size} must be a multiple of output_stride "
                            f"{output_stride} (the target is one class per output_stride^2 block)")
        if not isinstance(random_crop, bool):
            raise UserError(f"colorization: random_crop must be true or false, got {random_crop!r}")
        self.bins, self.output_stride, self.random_crop = bins, output_stride, random_crop

    @property
    def classes(self) -> int:
        return self.bins * self.bins

    def target_size(self) -> int:
        return self.image_size // self.output_stride

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, {"bins": self.bins, "output_stride": self.output_stride,
                                    "random_crop": self.random_crop})

    def caveats(self, source: "ImageSource") -> list[str]:
        """A warning when the first images (data.resized.GREY_SAMPLE) are all grey: every target is then the ab class of
        grey, so the task is learned from the first batches and teaches the trunk next to nothing (on
        Fashion-MNIST its features were below the raw pixels on every probe, bench/fmnist/RESULTS.md)."""
        if len(source) == 0 or not is_grey(first := first_images(source, self.image_size)):
            return []
        return [f"colorization: the images look grey (every channel equal in the first {len(first)}), so every target "
                f"is the same colour and the task has nothing to learn; use colour images or another --task "
                f"(e.g. context or simclr)"]

    def build_sample(self, image: Image.Image, rng: np.random.Generator,
                     other: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        lab = rgb_to_lab(np.asarray(square_crop(image, self.image_size, rng, self.random_crop)))
        inputs = lightness_input(lab)
        blocks = self.target_size(), self.output_stride, self.target_size(), self.output_stride, 2
        ab = lab[..., 1:].reshape(blocks).mean(axis=(1, 3))  # area-downsample before quantising
        return inputs, torch.from_numpy(quantise_ab(ab, self.bins))

    # --- on the batch (what training runs) ----------------------------------------------------------

    def dataset(self, source, seed: int):
        return square_images(source, self.image_size)

    def batch_transform(self):
        def coloured(images: torch.Tensor, generator: torch.Generator) -> TaskBatch:
            return self.batch_sample(images)

        return coloured

    def batch_sample(self, images: torch.Tensor) -> TaskBatch:
        """uint8 (B, 3, S, S) -> TaskBatch((B, 3, S, S) float32 L / 50 - 1 in 3 channels, (B, S/f, S/f) int64 ab
        classes of the f x f block means), as `build_sample` makes them image by image."""
        lab = rgb_to_lab_batch(images)  # (B, 3, S, S) float64
        inputs = (lab[:, :1] / 50.0 - 1.0).float().expand(-1, 3, -1, -1).contiguous()
        t, f = self.target_size(), self.output_stride
        ab = lab[:, 1:].reshape(len(lab), 2, t, f, t, f).mean(dim=(3, 5))  # area-downsample before quantising
        return TaskBatch(inputs, quantise_ab_map(ab, self.bins))

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels, height, _ = trunk_shape
        return UpsamplingDecoder(channels, height, self.classes, self.target_size())

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, bins^2, S/f, S/f) logits."""
        return head(trunk(inputs))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy averaged over all output pixels of the batch."""
        # Pixels as rows of one (B*h*w, classes) batch: the spatial (2-D) cross-entropy has no
        # deterministic CUDA kernel and would refuse `--deterministic`.
        logits = output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])
        return F.cross_entropy(logits, target.reshape(-1))

    def accuracy(self, output: torch.Tensor, target: torch.Tensor) -> float | None:
        """Fraction of output pixels whose top-1 class is the target class."""
        return (output.argmax(dim=1) == target).float().mean().item()
