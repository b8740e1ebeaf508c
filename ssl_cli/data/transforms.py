"""Image transforms: the deterministic evaluation transform a checkpoint records."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerImageNormalise:
    """(C, H, W) -> same with zero mean and unit std over the image (as jigsaw tiles were seen)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - image.mean()) / (image.std() + 1e-5)


def eval_transform(size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   per_image: bool = False) -> T.Compose:
    """PIL image -> (3, size, size) float tensor: resize the short side, centre crop, normalise."""
    steps = [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps + ([PerImageNormalise()] if per_image else []))
