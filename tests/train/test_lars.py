"""LARS: the trust ratio on weights, plain SGD + momentum on biases and norm parameters."""

from __future__ import annotations

import torch
from torch import nn

from ssl_cli.train.lars import LARS, param_groups
from ssl_cli.train.loop import TrainOptions, make_optimizer


def test_biases_and_norm_parameters_get_neither_decay_nor_adaptation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    weights, others = param_groups(model, 1e-4)
    assert [p.shape for p in weights["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert weights["weight_decay"] == 1e-4 and weights["adapt"]
    assert len(others["params"]) == 4 and others["weight_decay"] == 0.0 and not others["adapt"]
    optimizer = make_optimizer(model, TrainOptions(epochs=1, batch_size=2, lr=0.1, optimizer="lars", weight_decay=1e-4))
    assert isinstance(optimizer, LARS) and len(optimizer.param_groups) == 2


def test_one_step_matches_the_formula():
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
    weight.grad, bias.grad = torch.randn(3, 4), torch.randn(3)
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad.clone(), bias.grad.clone()
    lr, decay, eta = 0.5, 0.01, 0.001
    optimizer = LARS([{"params": [weight], "weight_decay": decay, "adapt": True},
                      {"params": [bias], "weight_decay": 0.0, "adapt": False}], lr=lr, momentum=0.9, eta=eta)
    optimizer.step()
    decayed = gw + decay * w0
    trust = eta * w0.norm() / decayed.norm()
    torch.testing.assert_close(weight.detach(), w0 - lr * trust * decayed)
    torch.testing.assert_close(bias.detach(), b0 - lr * gb)  # plain SGD: no trust ratio, no decay
    # second step: momentum carries the first update
    first_velocity = lr * trust * decayed
    weight.grad, bias.grad = gw.clone(), gb.clone()
    w1 = weight.detach().clone()
    optimizer.step()
    decayed = gw + decay * w1
    velocity = 0.9 * first_velocity + lr * (eta * w1.norm() / decayed.norm()) * decayed
    torch.testing.assert_close(weight.detach(), w1 - velocity)
    torch.testing.assert_close(bias.detach(), b0 - lr * gb - (0.9 * lr * gb + lr * gb))


def test_zero_weights_fall_back_to_a_trust_of_one():
    weight = nn.Parameter(torch.zeros(2, 2))
    weight.grad = torch.ones(2, 2)
    LARS([weight], lr=0.1, momentum=0.0).step()
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), -0.1))
