"""Cropping and normalising a PIL image into the tensor a task cuts its sample from."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def square_crop(image: Image.Image, size: int, rng: np.random.Generator, random_crop: bool) -> Image.Image:
    """Resize so the short side is `size`, then cut a size x size square (random via rng, or central).

    The central crop matches `eval_transform` (torchvision's Resize + CenterCrop) pixel for pixel.
    """
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short != size:
        long = int(size * long / short)
        image = image.resize((size, long) if width <= height else (long, size), Image.BILINEAR)
    width, height = image.size
    if random_crop:
        left, top = int(rng.integers(width - size + 1)), int(rng.integers(height - size + 1))
    else:
        left, top = round((width - size) / 2.0), round((height - size) / 2.0)  # as CenterCrop rounds
    return image.crop((left, top, left + size, top + size))


def to_normalised_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 with ImageNet mean/std (what `ssl extract` feeds the trunk)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std
