"""Shared helpers of the pretext task tests."""

from __future__ import annotations

import pytest
import torch

from ssl_cli.models.registry import build_model
from ssl_cli.pretext.base import PretextNetwork


@pytest.fixture
def adam_steps():
    """adam_steps(task, inputs, targets, steps) -> (losses, last output) of Adam on one fixed batch."""

    def adam_steps(task, inputs: torch.Tensor, targets: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor]:
        """Losses of `steps` Adam steps on one fixed batch, and the last output.

        One thread: the nets are tiny, and on shared cores OpenMP barriers cost more than the work.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(0)
            network = PretextNetwork(build_model("alexnet_lowres", num_classes=10, width=0.25), task)
            optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
            losses = []
            for _ in range(steps):
                output = network(inputs)
                loss = task.loss(output, targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            return losses, output.detach()
        finally:
            torch.set_num_threads(threads)

    return adam_steps
