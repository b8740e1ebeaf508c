"""Context task: labels match where the neighbour was cut, the gap holds, geometry errors name the minimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_cli.data.toy import draw_toy_image
from ssl_cli.errors import UserError
from ssl_cli.models.registry import build_model
from ssl_cli.pretext.base import PretextNetwork, per_image_normalise
from ssl_cli.pretext.handcrafted.context import CENTRE, NEIGHBOURS, ContextTask
from ssl_cli.pretext.crops import to_normalised_tensor


def toy_image(index: int, size: int) -> Image.Image:
    return Image.fromarray(draw_toy_image(index, index % 4, 4, size, 0))


@pytest.mark.parametrize("size, patch, gap, jitter", [(32, 8, 1, 1), (64, 16, 2, 2), (96, 24, 3, 3), (225, 56, 7, 7)])
def test_default_geometry_scales_with_the_image(size, patch, gap, jitter):
    task = ContextTask(size)
    assert (task.patch_size, task.gap, task.jitter) == (patch, gap, jitter)
    assert task.tile_size() == patch and task.span() <= size
    assert task.info().options == {"patch_size": patch, "gap": gap, "jitter": jitter, "color_drop": True,
                                   "random_crop": True}


@pytest.mark.parametrize("size, options", [(32, {}), (64, {}), (48, {"gap": 4, "jitter": 0, "patch_size": 12})])
def test_label_matches_where_the_neighbour_was_cut(size, options):
    task = ContextTask(size, color_drop=False, random_crop=False, **options)
    image = toy_image(3, size)
    original = to_normalised_tensor(image)
    p, pitch = task.patch_size, task.patch_size + 2 * task.jitter + task.gap
    seen = set()
    for seed in range(64):
        inputs, target, (centre, neighbour) = task.build_sample_with_positions(image, np.random.default_rng(seed))
        assert inputs.shape == (2, 3, p, p) and target.dtype == torch.int64
        for patch, (top, left) in zip(inputs, (centre, neighbour)):
            assert torch.allclose(patch, per_image_normalise(original[:, top:top + p, left:left + p]), atol=1e-5)
        row, column = NEIGHBOURS[int(target)]
        dy, dx = neighbour[0] - centre[0], neighbour[1] - centre[1]
        for delta, step in ((dy, row - CENTRE[0]), (dx, column - CENTRE[1])):
            assert abs(delta - step * pitch) <= 2 * task.jitter  # only the jitter moves it off the grid
        seen.add(int(target))
    assert seen == set(range(8))
    plain = task.build_sample(image, np.random.default_rng(5))
    full = task.build_sample_with_positions(image, np.random.default_rng(5))
    assert torch.equal(plain[0], full[0]) and torch.equal(plain[1], full[1])


@pytest.mark.parametrize("size, options", [(32, {}), (64, {}), (64, {"gap": 3, "jitter": 4, "patch_size": 10})])
def test_the_gap_holds_for_every_jitter(size, options):
    task = ContextTask(size, **options)
    p = task.patch_size
    positions = set()
    for seed in range(600):
        label = seed % 8
        centre, neighbour = task.patch_positions(label, np.random.default_rng(seed))
        positions.add(centre)
        for top, left in (centre, neighbour):
            assert 0 <= top and top + p <= size and 0 <= left and left + p <= size
        row, column = NEIGHBOURS[label]
        # Along every axis on which the two cells differ the patches are at least `gap` apart.
        if row != CENTRE[0]:
            assert max(centre[0], neighbour[0]) - (min(centre[0], neighbour[0]) + p) >= task.gap
        if column != CENTRE[1]:
            assert max(centre[1], neighbour[1]) - (min(centre[1], neighbour[1]) + p) >= task.gap
    assert len(positions) == (2 * task.jitter + 1) ** 2  # the jitter is used, in full


def test_too_small_images_and_bad_options_name_the_minimum():
    with pytest.raises(UserError, match="minimum image size is 32"):
        ContextTask(31)
    with pytest.raises(UserError, match="minimum image size is 52"):
        ContextTask(40, gap=8, jitter=2)  # 3 x (8 + 4) + 2 x 8
    with pytest.raises(UserError, match="minimum image size is 76"):
        ContextTask(64, patch_size=20, gap=2, jitter=2)
    with pytest.raises(UserError, match="patch_size must be an integer >= 8"):
        ContextTask(64, patch_size=6)
    with pytest.raises(UserError, match="gap"):
        ContextTask(64, gap=-1)
    with pytest.raises(UserError, match="jitter"):
        ContextTask(64, jitter=1.5)
    with pytest.raises(UserError, match="color_drop"):
        ContextTask(64, color_drop="no")


def test_colour_dropping_keeps_one_channel_per_patch():
    task = ContextTask(64, random_crop=False)
    image = toy_image(5, 64)
    kept = set()
    for seed in range(20):
        inputs, _ = task.build_sample(image, np.random.default_rng(seed))
        for patch in inputs:
            spread = patch.flatten(1).std(dim=1)
            strong = int(spread.argmax())
            assert (spread < 0.05 * spread[strong]).sum() == 2  # the other two are faint noise
            kept.add(strong)
            assert abs(float(patch.mean())) < 1e-4 and abs(float(patch.std()) - 1) < 1e-3
    assert kept == {0, 1, 2}


def test_the_trunk_runs_once_on_both_patches():
    task = ContextTask(64)
    network = PretextNetwork(build_model("alexnet_lowres", num_classes=10, width=0.25), task)
    calls = []
    trunk = network.trunk

    def counting_trunk(images):
        calls.append(images.shape)
        return trunk(images)

    inputs = torch.randn(3, 2, 3, 16, 16)
    output = task.forward(counting_trunk, network.head, inputs)
    assert output.shape == (3, 8) and calls == [(6, 3, 16, 16)]


def test_a_few_adam_steps_lower_the_loss(adam_steps):
    task = ContextTask(64)
    rng = np.random.default_rng(0)
    samples = [task.build_sample(toy_image(i, 64), rng) for i in range(12)]
    inputs, targets = (torch.stack(parts) for parts in zip(*samples))
    losses, output = adam_steps(task, inputs, targets, steps=20)
    assert output.shape == (12, 8) and 0.0 <= task.accuracy(output, targets) <= 1.0
    # Measured over seeds 0-5: final/initial between 0.17 and 0.56.
    assert losses[-1] < 0.8 * losses[0], losses
