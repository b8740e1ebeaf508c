"""A run whose loss leaves any sensible range stops with advice, leaving no complete checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from rows import InMemoryRows, classification_step
from torch import nn

from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.errors import UserError
from ssl_cli.train.loop import DIVERGENCE_FACTOR, DivergenceCheck, TrainOptions, train

CHANCE = math.log(2)


class Blobs(InMemoryRows):
    """Two gaussian blobs, 64 rows; (inputs, target, index, ok) like every training dataset."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 2, (64,), generator=generator)
        self.x = torch.randn(64, 8, generator=generator) + 2.0 * self.y[:, None]


step = classification_step


def test_check_trips_on_a_mean_far_above_chance_but_not_on_the_first_step_or_in_warm_up():
    high = DIVERGENCE_FACTOR * CHANCE * 2
    assert DivergenceCheck(CHANCE, 0).problem(high, 0) is None  # one step scores the initialisation only
    check = DivergenceCheck(CHANCE, warmup_steps=3)
    assert all(check.problem(high, s) is None for s in range(3))  # during warm-up
    assert check.problem(high, 3) is None and "chance level 0.693" in check.problem(high, 4)
    healthy = DivergenceCheck(CHANCE, 0)
    assert all(healthy.problem(loss, s) is None for s, loss in enumerate([0.7, 2.5, 0.7, 0.6, 0.5, 0.4, 0.3]))
    assert "nan" in DivergenceCheck(None, 10).problem(float("nan"), 0)  # non-finite: always, chance known or not
    assert DivergenceCheck(None, 0).problem(1e9, 5) is None


def train_blobs(out, lr, epochs=2, chance_loss=CHANCE):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    options = TrainOptions(epochs=epochs, batch_size=8, lr=lr, optimizer="sgd", seed=0, workers=0, schedule="constant")
    return train(model, Blobs(), step, options, out, make_provenance("checkpoint", "test", {}, {"lr": lr}, []),
                 lambda m: {"model": m.state_dict()}, chance_loss=chance_loss)


def test_a_divergent_run_stops_with_advice_and_writes_no_complete_checkpoint(tmp_path):
    out = tmp_path / "m.pt"
    with pytest.raises(UserError, match=r"training diverged at epoch 1, step \d+: the loss is .* over 3 x its chance "
                                        r"level 0\.693; lower --lr \(it was 5 with sgd\)") as caught:
        train_blobs(out, lr=5.0)
    assert "--optimizer sgd --lr 0.01 --momentum 0.9" in str(caught.value) and "--warmup-epochs" in str(caught.value)
    assert not out.exists() and not (tmp_path / "m.pt.partial").exists()
    assert "no checkpoint was written" in str(caught.value)


def test_the_same_run_at_a_sane_rate_is_not_stopped(tmp_path):
    result = train_blobs(tmp_path / "m.pt", lr=0.05)
    assert result.history[-1]["loss"] < CHANCE and (tmp_path / "m.pt").exists()
