"""Handcrafted samples cut on the batch, on the training device.

The loader only decodes and resizes: every image becomes a uint8 (3, R, R) square (short side resized
to R, centre square kept, `ResizedImages`; held in memory when the set fits, so an epoch costs an index,
not a decode). The task's `batch_transform()` then cuts the whole batch's tiles, patches, masks or
rotations with batched indexing (colorization converts the whole batch to Lab at once), every random
choice drawn per sample from the generator the loop seeds by (seed, epoch, step): a resumed run replays
the same samples. Each task keeps its per-image `build_sample` as the definition the batched sample is
tested against.

A batch built here carries its own targets (`TaskBatch`): the loader's targets are placeholders.
"""

from __future__ import annotations

import numpy as np
import torch

from ssl_cli.data.resized import ResizedImages
from ssl_cli.data.sources import ImageSource
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def square_images(source: ImageSource, size: int) -> ResizedImages:
    """Every image of `source` as uint8 (3, size, size): short side resized to `size`, centre square."""
    return ResizedImages(source, np.arange(len(source)), np.zeros(len(source), dtype=np.int64), size)


def cut_squares(images: torch.Tensor, sources: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor,
                size: int) -> torch.Tensor:
    """images (N, C, H, W); sources, tops, lefts (B, K) int64 -> (B, K, C, size, size), same dtype:
    square k of sample b is images[sources[b, k], :, tops[b, k]:+size, lefts[b, k]:+size]."""
    steps = torch.arange(size, device=images.device)
    rows = (tops[..., None] + steps)[..., :, None]  # (B, K, size, 1)
    columns = (lefts[..., None] + steps)[..., None, :]  # (B, K, 1, size)
    pixels = images.permute(0, 2, 3, 1)[sources[..., None, None], rows, columns]  # (B, K, size, size, C)
    return pixels.permute(0, 1, 4, 2, 3).contiguous()


def pil_grey(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> same with every channel PIL's luma, exactly as `convert("L").convert("RGB")`
    (ITU-R 601-2, fixed point: (19595 R + 38470 G + 7471 B + 2^15) >> 16)."""
    wide = pixels.to(torch.int32)
    luma = (wide[..., 0, :, :] * 19595 + wide[..., 1, :, :] * 38470 + wide[..., 2, :, :] * 7471 + 0x8000) >> 16
    return luma.to(torch.uint8).unsqueeze(-3).expand_as(pixels)


def imagenet_normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 255] float (..., 3, H, W) -> float32 with ImageNet mean/std, as `to_normalised_tensor`."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def integers(high: int | torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform int64 in [0, high) of `shape` on the generator's device; `high` may be a tensor that
    broadcasts to `shape` (one range per sample)."""
    if isinstance(high, int):
        return torch.randint(high, shape, generator=generator, device=generator.device)
    return (torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64) * high).long()


def random_subsets(batch: int, items: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, count) int64: per row `count` distinct items of 0..items-1 in a random order."""
    return torch.rand(batch, items, generator=generator, device=generator.device).argsort(dim=1)[:, :count]


def other_images(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch,) int64: for every sample another sample of the batch, uniformly (itself in a batch of one)."""
    own = torch.arange(batch, device=generator.device)
    if batch < 2:
        return own
    return (own + 1 + integers(batch - 1, (batch,), generator)) % batch
