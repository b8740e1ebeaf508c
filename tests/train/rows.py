"""Tiny in-memory training sets and a classification step for the loop's own tests."""

from __future__ import annotations

import torch
from torch import nn


class InMemoryRows:
    """Rows `x[i]`, `y[i]` held in memory, served as (inputs, target, index, ok) like every training dataset.
    Subclasses set `self.x` and `self.y` (tensors) in their `__init__`."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index], index, True

    def set_epoch(self, epoch: int) -> None:
        pass

    def sample_id(self, index: int) -> str:
        return str(index)


def classification_step(model, inputs, targets, context=None):
    """(loss, accuracy) of a batch under cross-entropy."""
    output = model(inputs)
    return nn.functional.cross_entropy(output, targets), (output.argmax(1) == targets).float().mean().item()
