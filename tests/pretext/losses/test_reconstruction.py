"""The autoencoder's reconstruction loss is the per-pixel mean squared error."""

from __future__ import annotations

import pytest
import torch

from ssl_cli.pretext.losses.reconstruction import reconstruction_loss


def test_mean_squared_error_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    loss = reconstruction_loss(output, target)
    count = output.numel()
    reference = sum((o - t) ** 2 for o, t in zip(output.flatten(), target.flatten())) / count
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(torch.autograd.grad(loss, output)[0], 2 * (output - target).detach() / count)


def test_mismatched_sizes_are_explained():
    with pytest.raises(ValueError, match="resize the decoder"):
        reconstruction_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 16, 16))
