"""SwAV's swapped prediction against a crop-by-crop, row-by-row reference."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_cli.pretext.losses.sinkhorn import sinkhorn
from ssl_cli.pretext.losses.swav import swapped_prediction

TEMPERATURE = 0.1


def reference_swapped_prediction(scores: list[torch.Tensor], codes: list[torch.Tensor],
                                 temperature: float) -> torch.Tensor:
    """The released code's loss, one crop pair, image and prototype at a time."""
    batch, prototypes = scores[0].shape
    total = torch.zeros((), dtype=torch.float64)
    for i, code in enumerate(codes):
        crop_loss = torch.zeros((), dtype=torch.float64)
        for v, crop in enumerate(scores):
            if v == i:
                continue
            for b in range(batch):
                log_partition = torch.log(sum(torch.exp(crop[b, k] / temperature) for k in range(prototypes)))
                for k in range(prototypes):
                    crop_loss = crop_loss - code[b, k].detach() * (crop[b, k] / temperature - log_partition) / batch
        total = total + crop_loss / (len(scores) - 1)
    return total / len(codes)


def crop_scores(crops: int = 4, batch: int = 3, prototypes: int = 5, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(crops, batch, prototypes, generator=generator, dtype=torch.float64)
    return [row.clamp(-1, 1).requires_grad_() for row in raw.unbind()]


def test_value_and_gradients_match_the_reference_with_two_assignment_crops_of_four():
    scores = crop_scores()
    codes = [sinkhorn(crop) for crop in scores[:2]]
    ours = swapped_prediction(scores, codes, TEMPERATURE)
    reference = reference_swapped_prediction(scores, codes, TEMPERATURE)
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(torch.autograd.grad(ours, scores), torch.autograd.grad(reference, scores)):
        torch.testing.assert_close(mine, theirs)


def test_codes_are_targets_without_gradient():
    scores = crop_scores(crops=3, seed=1)
    codes = [torch.softmax(crop.detach() * 4, dim=1).requires_grad_() for crop in scores[:1]]
    loss = swapped_prediction(scores, codes)
    assert torch.autograd.grad(loss, codes, allow_unused=True) == (None,)
    # A crop predicting a one-hot code: l = -log softmax at that prototype, averaged over v != i.
    one_hot = [torch.eye(5, dtype=torch.float64)[[0, 1, 2]]]
    expected = sum(-torch.log_softmax(scores[v].detach() / 0.1, dim=1)[range(3), [0, 1, 2]].mean() for v in (1, 2)) / 2
    torch.testing.assert_close(swapped_prediction(scores, one_hot).detach(), expected)
    assert math.isfinite(loss.item())


def test_bad_inputs_are_explained():
    scores = crop_scores()
    with pytest.raises(ValueError, match="at least 2 crops"):
        swapped_prediction(scores[:1], [scores[0]])
    with pytest.raises(ValueError, match="at least 2 crops"):
        swapped_prediction(scores, [])
    with pytest.raises(ValueError, match="one shape"):
        swapped_prediction(scores, [scores[0][:2]])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        swapped_prediction(scores, [scores[0]], temperature=0.0)
