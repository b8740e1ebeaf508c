"""Inpainting task: the hole is blank in the input and marked in the target, the loss weighs it, steps learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_cli.data.toy import draw_toy_image
from ssl_cli.errors import UserError
from ssl_cli.pretext.crops import to_normalised_tensor
from ssl_cli.pretext.handcrafted.inpainting import InpaintingTask

SIZE = 32


def toy_image(index: int) -> Image.Image:
    return Image.fromarray(draw_toy_image(index, index % 4, 4, SIZE, 0))


def test_center_mask_blanks_the_central_half_and_keeps_the_target():
    task = InpaintingTask(SIZE, random_crop=False)
    image = toy_image(0)
    inputs, target = task.build_sample(image, np.random.default_rng(0))
    assert inputs.shape == (3, SIZE, SIZE) and target.shape == (4, SIZE, SIZE)
    hidden = target[3].bool()
    assert int(hidden.sum()) == (SIZE // 2) ** 2
    assert hidden[SIZE // 4:3 * SIZE // 4, SIZE // 4:3 * SIZE // 4].all()
    assert torch.equal(target[:3], to_normalised_tensor(image))  # the target is the whole, unmasked image
    assert (inputs[:, hidden] == 0).all()
    assert torch.equal(inputs[:, ~hidden], target[:3, ~hidden])


def test_random_blocks_are_squares_of_a_quarter_to_a_half_placed_by_rng():
    task = InpaintingTask(SIZE, mask="random-block")
    corners = set()
    for seed in range(30):
        inputs, target = task.build_sample(toy_image(seed), np.random.default_rng(seed))
        rows, columns = torch.nonzero(target[3], as_tuple=True)
        side = int(rows.max() - rows.min()) + 1
        assert SIZE // 4 <= side <= SIZE // 2
        assert int(columns.max() - columns.min()) + 1 == side and int(target[3].sum()) == side * side
        assert (inputs[:, target[3].bool()] == 0).all()
        corners.add((int(rows.min()), int(columns.min())))
    assert len(corners) > 10
    first = task.build_sample(toy_image(1), np.random.default_rng(4))
    again = task.build_sample(toy_image(1), np.random.default_rng(4))
    assert torch.equal(first[1], again[1])


def test_loss_scores_the_hole_fully_and_the_context_lightly():
    task = InpaintingTask(SIZE, context_weight=0.01)
    _, target = task.build_sample(toy_image(0), np.random.default_rng(0))
    target = target.unsqueeze(0)
    image, hidden = target[:, :3], target[:, 3:].bool().expand(-1, 3, -1, -1)
    assert float(task.loss(image.clone(), target)) == 0.0
    off_in_hole = image + 2.0 * hidden
    assert float(task.loss(off_in_hole, target)) == pytest.approx(4.0)
    off_outside = image + 2.0 * ~hidden
    assert float(task.loss(off_outside, target)) == pytest.approx(0.01 * 4.0)
    assert task.accuracy(image, target) is None


def test_bad_options_name_the_option():
    with pytest.raises(UserError, match="valid masks: center, random-block"):
        InpaintingTask(SIZE, mask="centre")
    with pytest.raises(UserError, match="context_weight"):
        InpaintingTask(SIZE, context_weight=-1)
    with pytest.raises(UserError, match=">= 8"):
        InpaintingTask(6)
    info = InpaintingTask(SIZE, context_weight=0).info()
    assert info.options == {"mask": "center", "context_weight": 0.0, "random_crop": True}


def test_a_few_adam_steps_lower_the_loss(adam_steps):
    task = InpaintingTask(SIZE)
    rng = np.random.default_rng(0)
    samples = [task.build_sample(toy_image(i), rng) for i in range(12)]
    inputs, targets = (torch.stack(parts) for parts in zip(*samples))
    losses, output = adam_steps(task, inputs, targets, steps=30)
    assert output.shape == (12, 3, SIZE, SIZE)
    # Measured over seeds 0-5: final/initial between 0.74 and 0.85.
    assert losses[-1] < 0.92 * losses[0], losses
