"""Pseudo-label filtering and balancing on hand-made teacher predictions."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_cli.errors import UserError
from ssl_cli.selftrain.policy import probabilities, select

PROBS = np.array([
    [0.90, 0.05, 0.05],  # 0: class 0, confident
    [0.60, 0.30, 0.10],  # 1: class 0
    [0.40, 0.35, 0.25],  # 2: class 0, unsure
    [0.10, 0.80, 0.10],  # 3: class 1
    [0.20, 0.20, 0.60],  # 4: class 2
    [0.70, 0.20, 0.10],  # 5: class 0
], dtype=np.float32)


def test_threshold_keeps_confident_images_only():
    chosen = select(PROBS, threshold=0.65)
    assert chosen.indices.tolist() == [0, 3, 5]
    assert chosen.hard.tolist() == [0, 1, 0]
    assert np.allclose(chosen.confidence, [0.9, 0.8, 0.7])


def test_balance_keeps_the_most_confident_per_class_and_repeats_short_classes():
    chosen = select(PROBS, threshold=0.0, balance=2)
    assert chosen.indices.tolist() == [0, 5, 3, 3, 4, 4]  # class 0 capped at its top 2; 1 and 2 repeated
    assert np.bincount(chosen.hard).tolist() == [2, 2, 2]


def test_soft_targets_sum_to_one_and_sharpen_with_a_low_temperature():
    logits = np.log(PROBS)
    assert np.allclose(probabilities(logits).sum(axis=1), 1.0, atol=1e-6)
    assert np.allclose(probabilities(logits), PROBS, atol=1e-6)
    sharp = probabilities(logits, temperature=0.5)
    assert np.allclose(sharp.sum(axis=1), 1.0, atol=1e-6)
    assert (sharp.max(axis=1) > PROBS.max(axis=1)).all()
    assert np.allclose(select(sharp).soft.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [({"threshold": 1.5}, "in [0, 1]"), ({"threshold": -0.1}, "in [0, 1]"),
                                             ({"balance": 0}, "at least 1")])
def test_bad_policy_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        select(PROBS, **kwargs)


def test_a_threshold_nobody_reaches_selects_nothing():
    chosen = select(PROBS, threshold=0.95, balance=3)
    assert len(chosen.indices) == 0 and chosen.soft.shape == (0, 3)
