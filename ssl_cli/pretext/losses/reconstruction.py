"""Reconstruction loss of the autoencoder baseline: mean squared error over every pixel.

    loss = 1/(B C H W) sum_{b,c,h,w} (output - target)^2,   output, target: (B, C, H, W).

The target is the (normalised) input image itself; the decoder's output must match its size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> scalar mean squared error; gradient flows to both."""
    if output.ndim != 4 or output.shape != target.shape:
        raise ValueError(
            f"reconstruction loss needs output and target as (B, C, H, W) of one shape, got "
            f"{tuple(output.shape)} and {tuple(target.shape)}; resize the decoder's output to the "
            "input size."
        )
    return F.mse_loss(output, target)
