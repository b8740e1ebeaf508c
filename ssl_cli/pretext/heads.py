"""Decoder heads shared by the dense tasks (colorization, inpainting)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_cli.models.projected import projection_block

# Channels of the decoder's hidden layers: enough for 256 ab classes on toy-to-ImageNet sizes.
DECODER_WIDTH = 128


def resize_bilinear(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size), bilinear (align_corners=False) as two matrix products.

    Same values as F.interpolate(mode="bilinear"), but the backward pass is a matmul, which is
    deterministic on CUDA (interpolate's backward refuses `--deterministic` there).
    """
    height, width = maps.shape[-2:]
    if (height, width) == (size, size):
        return maps
    rows = _interpolation_matrix(height, size, maps)
    columns = _interpolation_matrix(width, size, maps)
    return torch.einsum("bchw,hy,wx->bcyx", maps, rows, columns)


def _interpolation_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_in, n_out): column o holds the weights 1-D linear interpolation gives output o."""
    identity = torch.eye(n_in, dtype=like.dtype, device=like.device).unsqueeze(0)
    return F.interpolate(identity, size=n_out, mode="linear", align_corners=False)[0]


class UpsamplingDecoder(nn.Module):
    """(B, C, h, w) trunk map -> (B, out_channels, out_size, out_size).

    1x1 conv to `width` channels, x2 up-convolutions (channels halving, at least 32) until the
    map is within a factor sqrt(2) of `out_size` for an h x h input, a 3x3 conv to
    `out_channels`, then an exact bilinear resize (which also absorbs an unexpected map size).
    """

    def __init__(self, in_channels: int, in_size: int, out_channels: int, out_size: int,
                 width: int = DECODER_WIDTH):
        super().__init__()
        self.out_size = out_size
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 1), nn.ReLU(inplace=True)]
        for _ in range(max(0, round(math.log2(out_size / max(1, in_size))))):
            narrower = max(32, width // 2)
            layers += [nn.ConvTranspose2d(width, narrower, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            width = narrower
        layers.append(nn.Conv2d(width, out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, trunk_map: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(self.layers(trunk_map), self.out_size)


def global_pool(trunk_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C): the mean over positions (a mean, not AdaptiveAvgPool2d, whose CUDA
    backward refuses deterministic mode)."""
    return trunk_map.mean(dim=(2, 3))


class ProjectionMLP(nn.Module):
    """(B, dims[0]) -> (B, dims[-1]): Linear layers between consecutive dims; every layer but the
    last is followed by batch norm (when `batch_norm`) and ReLU; `last_norm` adds a batch norm
    without affine parameters after the last (SimCLRv2's head).

    SimCLR: dims (d, d, 128); SimCLRv2: (d, d, d, 128); MoCo v1: (d, 128); MoCo v2: (d, 2048, 128).
    `layers[i]` is the i-th block (Linear, [BN], [ReLU]), so a block can be read on its own (SimCLRv2
    finetunes from the output of the first).
    """

    def __init__(self, dims: list[int], batch_norm: bool = True, last_norm: bool = False):
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"a projection needs at least an input and an output size, got {dims}")
        blocks: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-2], dims[1:-1]):  # hidden blocks: the layout `ProjectedNetwork` reads
            blocks.append(projection_block(d_in, d_out) if batch_norm
                          else nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(inplace=True)))
        last: list[nn.Module] = [nn.Linear(dims[-2], dims[-1], bias=not last_norm)]
        if last_norm:
            last.append(nn.BatchNorm1d(dims[-1], affine=False))
        blocks.append(nn.Sequential(*last))
        self.layers = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
