"""Colorization task: ab classes round-trip within a bin, a few steps learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_cli.data.colour import lab_to_rgb, rgb_to_lab
from ssl_cli.data.resized import is_grey, to_uint8
from ssl_cli.data.toy import draw_toy_image
from ssl_cli.errors import UserError
from ssl_cli.pretext.handcrafted.colorization import AB_RANGE, ColorizationTask, class_centres, quantise_ab
from ssl_cli.pretext.heads import resize_bilinear

SIZE = 32


def toy_image(index: int) -> Image.Image:
    return Image.fromarray(draw_toy_image(index, index % 4, 4, SIZE, 0))


def random_colours() -> np.ndarray:
    """(100, 100, 3) uint8: random colours plus the 8 corners of the RGB cube."""
    colours = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    corners = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.uint8)
    colours[0, :8] = corners
    return colours


@pytest.mark.parametrize("bins", [16, 32])
def test_quantised_colours_round_trip_within_a_bin(bins):
    colours = random_colours()
    lab = rgb_to_lab(colours)
    classes = quantise_ab(lab[..., 1:], bins)
    assert classes.dtype == np.int64 and classes.min() >= 0 and classes.max() < bins ** 2
    centres = class_centres(bins)
    assert centres.shape == (bins ** 2, 2)
    assert np.array_equal(quantise_ab(centres, bins), np.arange(bins ** 2))
    restored_ab = centres[classes]
    assert np.abs(restored_ab - lab[..., 1:]).max() <= AB_RANGE / bins  # half a bin of 2 x 110 / bins
    restored = lab_to_rgb(np.concatenate([lab[..., :1], restored_ab], axis=-1))
    # Measured: mean error 0.028 at 16 bins, 0.015 at 32 (the max is larger where clipping to the gamut bites).
    assert np.abs(restored - colours / 255.0).mean() < 0.5 / bins


def test_quantise_clips_values_outside_the_grid():
    assert quantise_ab(np.array([[-500.0, 500.0]]), 16).tolist() == [15]
    assert quantise_ab(np.array([[0.0, 0.0]]), 16).tolist() == [8 * 16 + 8]


def test_sample_is_lightness_in_and_colour_classes_out():
    task = ColorizationTask(SIZE, random_crop=False)
    inputs, target = task.build_sample(toy_image(0), np.random.default_rng(0))
    assert inputs.shape == (3, SIZE, SIZE) and inputs.dtype == torch.float32
    assert torch.equal(inputs[0], inputs[1]) and torch.equal(inputs[0], inputs[2])
    assert inputs.min() >= -1 and inputs.max() <= 1
    assert target.shape == (SIZE // 4, SIZE // 4) and target.dtype == torch.int64
    assert target.min() >= 0 and target.max() < 256
    uniform = Image.new("RGB", (48, 40), (200, 30, 60))
    inputs, target = task.build_sample(uniform, np.random.default_rng(0))
    lightness, *ab = rgb_to_lab(np.array([[[200, 30, 60]]], dtype=np.uint8))[0, 0]
    assert target.unique().tolist() == [int(quantise_ab(np.array(ab)))]
    assert torch.allclose(inputs, torch.full_like(inputs, lightness / 50 - 1))


def test_bad_options_name_the_option():
    with pytest.raises(UserError, match="bins must be an integer in 2..64"):
        ColorizationTask(SIZE, bins=1)
    with pytest.raises(UserError, match="bins"):
        ColorizationTask(SIZE, bins=500)
    with pytest.raises(UserError, match="multiple of output_stride"):
        ColorizationTask(30, output_stride=4)
    with pytest.raises(UserError, match=">= 8"):
        ColorizationTask(4, output_stride=1)
    info = ColorizationTask(SIZE, bins=8, output_stride=2).info()
    assert info.options == {"bins": 8, "output_stride": 2, "random_crop": True}


@pytest.mark.parametrize("size, out", [(3, 8), (4, 8), (5, 5), (7, 3)])
def test_matrix_resize_matches_bilinear_interpolate(size, out):
    maps = torch.randn(2, 3, size, size)
    want = F.interpolate(maps, size=(out, out), mode="bilinear", align_corners=False)
    assert torch.allclose(resize_bilinear(maps, out), want, atol=1e-5)


def test_loss_is_the_mean_per_pixel_cross_entropy():
    output, target = torch.randn(2, 9, 4, 4), torch.randint(0, 9, (2, 4, 4))
    task = ColorizationTask(SIZE, bins=3)
    assert torch.allclose(task.loss(output, target), F.cross_entropy(output, target))
    assert task.accuracy(output, target) == (output.argmax(1) == target).float().mean().item()


def test_a_few_adam_steps_lower_the_loss(adam_steps):
    task = ColorizationTask(SIZE)
    rng = np.random.default_rng(0)
    samples = [task.build_sample(toy_image(i), rng) for i in range(12)]
    inputs, targets = (torch.stack(parts) for parts in zip(*samples))
    losses, output = adam_steps(task, inputs, targets, steps=20)
    assert output.shape == (12, 256, SIZE // 4, SIZE // 4)
    assert 0.0 <= task.accuracy(output, targets) <= 1.0
    # Measured over seeds 0-5: final/initial between 0.45 and 0.49.
    assert losses[-1] < 0.6 * losses[0], losses


class ListSource:
    """The two methods of an ImageSource that caveats reads."""

    def __init__(self, images: list[Image.Image]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return self.images[index]


def test_grey_images_get_a_caveat_and_colour_ones_none():
    colour = [toy_image(i) for i in range(6)]
    grey_rgb = [image.convert("L").convert("RGB") for image in colour]
    task = ColorizationTask(SIZE)
    def grey(image: Image.Image) -> bool:
        return is_grey(to_uint8(image, SIZE)[None])

    assert not grey(colour[0]) and grey(grey_rgb[0]) and grey(colour[0].convert("L"))
    assert task.caveats(ListSource(colour)) == []
    assert task.caveats(ListSource(grey_rgb[:3] + colour[3:4])) == []  # one colour image in the sample is enough
    [message] = task.caveats(ListSource(grey_rgb))
    assert "grey" in message and "another --task" in message


def test_pretext_stage_warns_on_grey_images_only_when_it_trains(tmp_path):
    from typer.testing import CliRunner

    from ssl_cli.cli import app

    for index in range(8):
        folder = tmp_path / "grey" / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        toy_image(index).convert("L").save(folder / f"{index}.png")
    command = ["pretext", "--task", "colorization", "--arch", "alexnet_bn_lowres", "--image-size", "32", "--batch-size",
               "4", "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress", "--data",
               str(tmp_path / "grey"), "--out", str(tmp_path / "c.pt")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "look grey" in result.output
    result = CliRunner().invoke(app, command)  # up to date: nothing trains, so nothing to warn about
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert "look grey" not in result.output
