"""LARS (You, Gitman & Ginsburg 2017), as SimCLR and SwAV use it for large batches.

For each parameter tensor w with gradient g, SGD with momentum runs on a locally scaled gradient:

    g' = g + wd * w                                  (weight decay, only where `adapt` is on)
    trust = eta * ||w|| / ||g'||   if both norms > 0, else 1
    v = momentum * v + lr * trust * g'
    w = w - v

Following SimCLR (and solo-learn's `exclude_bias_n_norm`), biases and normalisation parameters
(every tensor with one dimension) get neither weight decay nor the trust ratio: their groups carry
`adapt=False` and train with plain SGD + momentum. `param_groups(model, weight_decay)` makes the two groups.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of trainable parameters: weights (decayed, adapted) and biases / norm parameters (neither)."""
    weights, others = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (weights if parameter.ndim > 1 else others).append(parameter)
    groups = [{"params": weights, "weight_decay": weight_decay, "adapt": True}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "adapt": False})
    return groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-tensor trust ratio `eta * ||w|| / ||g + wd * w||` on groups with `adapt`."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, adapt: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: bad settings lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                                  "adapt": adapt})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                gradient = parameter.grad
                if group["adapt"]:
                    if group["weight_decay"]:
                        gradient = gradient.add(parameter, alpha=group["weight_decay"])
                    weight_norm, gradient_norm = torch.linalg.vector_norm(parameter), torch.linalg.vector_norm(gradient)
                    trust = torch.where((weight_norm > 0) & (gradient_norm > 0),
                                        group["eta"] * weight_norm / gradient_norm, torch.ones_like(weight_norm))
                    gradient = gradient.mul(trust)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                velocity = state["momentum_buffer"]
                velocity.mul_(group["momentum"]).add_(gradient, alpha=group["lr"])
                parameter.sub_(velocity)
        return loss
