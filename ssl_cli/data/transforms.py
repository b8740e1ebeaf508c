"""Image transforms: the deterministic evaluation transform a checkpoint records."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision import transforms as T

from ssl_cli.data.colour import lightness_input, rgb_to_lab

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerImageNormalise:
    """(C, H, W) -> same with zero mean and unit std over the image (as jigsaw tiles were seen)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - image.mean()) / (image.std() + 1e-5)


class LightnessInput:
    """PIL RGB image -> (3, H, W) lightness input, as a colorization trunk was trained on."""

    def __call__(self, image) -> torch.Tensor:
        return lightness_input(rgb_to_lab(np.asarray(image)))


class SobelInput:
    """(3, H, W) in [0, 1] -> (3, H, W) Sobel input (`batch_augment.sobel`), as a DeepCluster --sobel trunk saw."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from ssl_cli.data.batch_augment import sobel

        return sobel(image.unsqueeze(0))[0]


def eval_batch(pixels: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               per_image: bool = False) -> torch.Tensor:
    """(B, H, W, C) uint8 rows already at the input size (C = 1 or 3) -> (B, 3, H, W) float32, the bytes
    `eval_transform` gives image by image (its resize and crop are no-ops at that size): grey repeated to RGB as
    PIL's convert("RGB") does, ToTensor's x / 255, Normalize's (x - mean) / std, then PerImageNormalise."""
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(*pixels.shape[:-1], 3)
    images = pixels.permute(0, 3, 1, 2).to(torch.float32).div(255)  # channels_last, as inference runs
    images.sub_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    images.div_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    if per_image:  # image by image: the reductions in the order PerImageNormalise takes them
        normalise = PerImageNormalise()
        images = torch.stack([normalise(image) for image in images.contiguous()])  # NCHW reductions
    return images


def eval_transform(size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   per_image: bool = False, input_mode: str = "rgb") -> T.Compose:
    """PIL image -> (3, size, size) float tensor: resize the short side, centre crop, normalise.

    input_mode "lightness" gives the L channel instead (a colorization checkpoint's input), "sobel"
    the Sobel responses (a DeepCluster checkpoint trained with sobel=true).
    """
    if input_mode == "lightness":
        return T.Compose([T.Resize(size), T.CenterCrop(size), LightnessInput()])
    if input_mode == "sobel":
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), SobelInput()])
    steps = [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps + ([PerImageNormalise()] if per_image else []))
