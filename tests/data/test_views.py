"""Tests of the batched SimCLR / MoCo v2 views: reproducibility, shapes, each step on its own, presets.

Each step is checked against what it claims (an independent torchvision reference for brightness,
contrast and saturation; invariants for the hue rotation, blur and crop), not against timing.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from ssl_cli.data import views
from ssl_cli.data.views import (
    PRESETS,
    ViewRecipe,
    augment,
    blur_kernel_size,
    make_views,
    view_recipe,
)
from ssl_cli.errors import UserError

SIZE = 32

# Every random step off and no normalisation: a base that a test turns one step on in.
OFF = {"min_scale": 1.0, "flip_prob": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
       "jitter_prob": 0.0, "grey_prob": 0.0, "blur_prob": 0.0, "mean": (0.0,), "std": (1.0,)}


def only(**changes) -> ViewRecipe:
    """A SIZE-px recipe with every step off except `changes`."""
    return ViewRecipe(image_size=SIZE, **{**OFF, **changes})


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int = 16, channels: int = 3, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """uint8 (batch, channels, size, size) random images."""
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=generator(seed))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,) mean squared Laplacian (discrete second difference in both axes)."""
    lap = x[..., 1:-1, 1:-1] * 4 - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.pow(2).flatten(1).mean(1)


# --- reproducibility, shapes ------------------------------------------------------------------------


def test_same_seed_same_views_and_other_seed_other_views() -> None:
    recipe = view_recipe("simclr", SIZE)
    batch = images()
    first = make_views(batch, recipe, generator(1), count=3)
    again = make_views(batch, recipe, generator(1), count=3)
    other = make_views(batch, recipe, generator(2), count=3)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    assert not torch.allclose(first[0], first[1])  # the views of one call are independent


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_views_shape_dtype_and_count(preset: str) -> None:
    recipe = view_recipe(preset, SIZE)
    out = make_views(images(batch=5), recipe, generator(), count=3)
    assert len(out) == 3
    for view in out:
        assert view.shape == (5, 3, SIZE, SIZE) and view.dtype == torch.float32
        assert torch.isfinite(view).all()


def test_one_view_is_augment() -> None:
    recipe = view_recipe("moco2", SIZE)
    batch = images()
    (view,) = make_views(batch, recipe, generator(3), count=1)
    assert torch.equal(view, augment(batch, recipe, generator(3)))


def test_two_views_are_augment_of_the_doubled_batch() -> None:
    recipe = view_recipe("cifar", SIZE)
    batch = images(batch=4)
    first, second = make_views(batch, recipe, generator(5))
    both = augment(torch.cat([batch, batch]), recipe, generator(5))
    assert torch.equal(first, both[:4]) and torch.equal(second, both[4:])


def test_one_channel_images_with_the_grey_preset() -> None:
    recipe = view_recipe("grey", 28, mean=(0.5,), std=(0.5,))
    out = make_views(images(batch=6, channels=1, size=28), recipe, generator())
    assert [view.shape for view in out] == [(6, 1, 28, 28)] * 2
    assert out[0].min() >= -1 and out[0].max() <= 1


# --- each step does what it says ------------------------------------------------------------------------


def test_everything_off_is_identity() -> None:
    batch = images()
    assert torch.equal(augment(batch, only(), generator()), unit(batch))


def test_flip_only_gives_the_image_or_its_mirror() -> None:
    batch = images(batch=64)
    out = augment(batch, only(flip_prob=0.5), generator())
    original, mirrored = unit(batch), unit(batch).flip(-1)
    same = (out - original).abs().flatten(1).amax(1) < 1e-5
    flipped = (out - mirrored).abs().flatten(1).amax(1) < 1e-5
    assert (same | flipped).all()
    assert same.any() and flipped.any()


def test_crop_of_the_whole_image_without_flip_is_identity() -> None:
    recipe = only(min_scale=1.0, max_scale=1.0)
    theta = views.crop_flip_theta(8, recipe, generator(), torch.device("cpu"))
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(8, 2, 3))
    x = unit(images(batch=8))
    assert torch.allclose(views.warp(x, theta), x, atol=1e-5)


def test_crop_area_and_aspect_ratio_are_in_range() -> None:
    recipe = only(min_scale=0.2, max_scale=0.5, flip_prob=0.5)
    theta = views.crop_flip_theta(500, recipe, generator(), torch.device("cpu"))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area, ratio = width * height, width / height
    assert (area >= 0.2 - 1e-6).all() and (area <= 0.5 + 1e-6).all()
    assert (ratio >= 3 / 4 - 1e-6).all() and (ratio <= 4 / 3 + 1e-6).all()
    # the crop stays inside the image
    assert ((theta[:, 0, 2].abs() + width) <= 1 + 1e-6).all()
    assert ((theta[:, 1, 2].abs() + height) <= 1 + 1e-6).all()
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()  # some flipped, some not


def test_crop_upsamples_a_patch() -> None:
    # A half-width, half-height crop at the top left samples only the top-left quarter (and, bilinearly,
    # the first pixel past it: the last output pixel centre falls between pixels 15 and 16).
    x = torch.zeros(1, 3, SIZE, SIZE)
    x[..., : SIZE // 2 + 1, : SIZE // 2 + 1] = 1.0
    theta = torch.tensor([[[0.5, 0.0, -0.5], [0.0, 0.5, -0.5]]])
    assert torch.allclose(views.warp(x, theta), torch.ones(1, 3, SIZE, SIZE), atol=1e-6)


def test_grid_matches_torch_affine_grid() -> None:
    theta = torch.randn(4, 2, 3, generator=generator())
    expected = F.affine_grid(theta, [4, 3, 20, 24], align_corners=False)
    assert torch.allclose(views.affine_grid(theta, 20, 24), expected, atol=1e-5)


def test_brightness_only_scales_each_image_by_one_factor_in_range() -> None:
    # pixels <= 0.4, so a factor up to 1.5 never clamps
    batch = torch.randint(10, 100, (32, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator())
    out = augment(batch, only(brightness=0.5, jitter_prob=1.0), generator())
    ratio = out / unit(batch)
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-5)
    assert (per_image[:, 0] >= 0.5 - 1e-6).all() and (per_image[:, 0] <= 1.5 + 1e-6).all()
    assert per_image[:, 0].std() > 0.1  # one factor per image, not per batch


def test_jitter_probability_leaves_some_images_alone() -> None:
    batch = images(batch=64)
    out = augment(batch, only(brightness=0.5, jitter_prob=0.5), generator())
    unchanged = (out - unit(batch)).abs().flatten(1).amax(1) < 1e-6
    assert unchanged.any() and not unchanged.all()


def test_contrast_keeps_the_mean_luma() -> None:
    batch = torch.randint(100, 156, (16, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator())  # no clamp
    out = augment(batch, only(contrast=0.8, jitter_prob=1.0), generator())
    luma = torch.tensor(views.LUMA).view(1, 3, 1, 1)
    before, after = (unit(batch) * luma).sum(1).mean((1, 2)), (out * luma).sum(1).mean((1, 2))
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(out, unit(batch))


@pytest.mark.parametrize("order", ["fixed", "random"])
def test_jitter_matches_torchvision_in_each_images_order(order: str) -> None:
    """Brightness, contrast and saturation against torchvision's tensor functions, image by image."""
    recipe = only(brightness=0.8, contrast=0.8, saturation=0.8, jitter_prob=1.0, jitter_order=order)
    x = unit(images(batch=24))
    factors, drawn_order = views.jitter_parameters(24, 3, recipe, generator(), x.device)
    assert list(factors) == ["brightness", "contrast", "saturation"]
    out = views.apply_jitter(x, factors, drawn_order)
    reference = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
                 "saturation": TF.adjust_saturation}
    names = list(factors)
    for i in range(24):
        expected = x[i]
        for index in drawn_order[i].tolist():
            expected = reference[names[index]](expected, float(factors[names[index]][i]))
        assert torch.allclose(out[i], expected, atol=2e-3), f"image {i}, order {drawn_order[i].tolist()}"
    if order == "fixed":
        assert (drawn_order == torch.arange(3)).all()
    else:
        assert len({tuple(row) for row in drawn_order.tolist()}) > 1


def test_hue_rotation_by_zero_is_identity_and_keeps_grey_pixels() -> None:
    x = unit(images(batch=8))
    assert torch.allclose(views.apply_colour(x, views.hue_matrices(torch.zeros(8))), x, atol=1e-6)
    grey = unit(images(batch=8, channels=1)).expand(-1, 3, -1, -1)
    turns = torch.linspace(-0.5, 0.5, 8)
    assert torch.allclose(views.apply_colour(grey, views.hue_matrices(turns)), grey, atol=1e-5)


def test_hue_rotation_keeps_luma_and_composes() -> None:
    turns = torch.tensor([0.1, 0.25, -0.3])
    matrices = views.hue_matrices(turns)
    luma = torch.tensor(views.LUMA)
    assert torch.allclose(luma @ matrices, luma.expand(3, 3), atol=1e-5)  # output luma = input luma
    back = views.hue_matrices(-turns)
    assert torch.allclose(back @ matrices, torch.eye(3).expand(3, 3, 3), atol=1e-5)
    assert torch.allclose(views.hue_matrices(torch.tensor([1.0])), torch.eye(3), atol=1e-5)  # a full turn


def test_hue_only_recipe_changes_colour_not_grey_images() -> None:
    recipe = only(hue=0.5, jitter_prob=1.0)
    colour = images(batch=8)
    assert not torch.allclose(augment(colour, recipe, generator()), unit(colour), atol=1e-3)
    grey = images(batch=8, channels=1).expand(-1, 3, -1, -1)
    assert torch.allclose(augment(grey, recipe, generator()), unit(grey), atol=1e-5)


def test_saturation_zero_is_grey() -> None:
    x = unit(images(batch=4))
    out = views.apply_colour(x, views.saturation_matrices(torch.zeros(4)))
    assert torch.allclose(out, views.grey(x), atol=1e-6)


def test_greyscale_makes_the_channels_equal() -> None:
    out = augment(images(), only(grey_prob=1.0), generator())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    some = augment(images(batch=64), only(grey_prob=0.5), generator())
    equal = (some[:, 0] - some[:, 1]).abs().flatten(1).amax(1) < 1e-6
    assert equal.any() and not equal.all()


def test_blur_reduces_high_frequency_energy() -> None:
    batch = images()
    out = augment(batch, only(blur_prob=1.0), generator())
    before, after = high_frequency_energy(unit(batch)), high_frequency_energy(out)
    # never more; sigma near 0.1 is almost the identity, so the drop shows on average
    assert (after <= before + 1e-6).all() and after.mean() < 0.5 * before.mean()
    # a wider sigma blurs more; a flat image stays flat (the kernel sums to 1)
    x = unit(batch)
    narrow = views.gaussian_blur(x, torch.full((16,), 0.5), 5)
    wide = views.gaussian_blur(x, torch.full((16,), 2.0), 5)
    assert (high_frequency_energy(wide) < high_frequency_energy(narrow)).all()
    flat = torch.full((2, 3, SIZE, SIZE), 0.3)
    assert torch.allclose(views.gaussian_blur(flat, torch.tensor([0.5, 2.0]), 5), flat, atol=1e-6)


def test_blur_matches_a_direct_convolution() -> None:
    x = unit(images(batch=2))
    sigma = torch.tensor([0.7, 1.6])
    out = views.gaussian_blur(x, sigma, 5)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    for i in range(2):
        kernel = torch.exp(-taps ** 2 / (2 * sigma[i] ** 2))
        kernel = kernel / kernel.sum()
        weight = (kernel[:, None] * kernel[None, :]).expand(3, 1, 5, 5)
        expected = F.conv2d(F.pad(x[i : i + 1], (2, 2, 2, 2), mode="reflect"), weight, groups=3)
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5)


def test_blur_probability_blurs_some_images() -> None:
    batch = images(batch=64)
    out = augment(batch, only(blur_prob=0.5), generator())
    unchanged = (out - unit(batch)).abs().flatten(1).amax(1) < 1e-6
    assert unchanged.any() and not unchanged.all()


def test_solarize_inverts_bright_pixels() -> None:
    batch = images()
    out = augment(batch, only(solarize_prob=1.0, solarize_threshold=0.5), generator())
    x = unit(batch)
    assert torch.allclose(out, torch.where(x >= 0.5, 1 - x, x))


def test_normalisation_uses_mean_and_std() -> None:
    batch = images()
    out = augment(batch, only(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5)), generator())
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    expected = (unit(batch) - mean) / std
    assert torch.allclose(out, expected, atol=1e-6)


# --- presets and errors -----------------------------------------------------------------------------------


def test_presets_follow_the_papers() -> None:
    simclr = view_recipe("simclr", 224)
    assert (simclr.min_scale, simclr.brightness, simclr.contrast, simclr.saturation) == (0.08, 0.8, 0.8, 0.8)
    assert math.isclose(simclr.hue, 0.2)
    assert (simclr.jitter_prob, simclr.grey_prob, simclr.blur_prob) == (0.8, 0.2, 0.5)
    assert simclr.blur_kernel == 23 and simclr.blur_sigma == (0.1, 2.0)
    moco = view_recipe("moco2", 224)
    assert (moco.min_scale, moco.brightness, moco.contrast, moco.saturation) == (0.2, 0.4, 0.4, 0.4)
    assert moco.hue == 0.1
    assert (moco.jitter_prob, moco.grey_prob, moco.blur_prob, moco.flip_prob) == (0.8, 0.2, 0.5, 0.5)
    cifar = view_recipe("cifar", 32)
    assert cifar.blur_prob == 0.0 and cifar.min_scale == 0.08 and math.isclose(cifar.brightness, 0.4)
    assert view_recipe("cifar", 96).blur_prob == 0.5
    grey = view_recipe("grey", 28)
    assert (grey.saturation, grey.hue, grey.grey_prob, grey.blur_prob) == (0.0, 0.0, 0.0, 0.0)
    assert grey.brightness > 0 and grey.contrast > 0 and grey.flip_prob == 0.5


def test_blur_kernel_follows_the_image_size() -> None:
    assert [blur_kernel_size(size) for size in (28, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    assert view_recipe("simclr", 96).blur_kernel == 9
    assert view_recipe("simclr", 96, blur_kernel=5).blur_kernel == 5


def test_overrides_and_jitter_strength() -> None:
    recipe = view_recipe("simclr", SIZE, jitter_strength=0.5, min_scale=0.3, mean=[0.5, 0.5, 0.5])
    assert math.isclose(recipe.brightness, 0.4) and math.isclose(recipe.hue, 0.1)
    assert recipe.min_scale == 0.3 and recipe.mean == (0.5, 0.5, 0.5)
    assert view_recipe("simclr", SIZE, jitter_strength=0.5, hue=0.0).hue == 0.0


def test_bad_preset_names_the_valid_ones() -> None:
    with pytest.raises(UserError, match="did you mean 'simclr'.*simclr, moco2, cifar, grey"):
        view_recipe("simclrr", SIZE)


def test_bad_field_names_the_valid_ones() -> None:
    with pytest.raises(UserError, match="blurr_prob.*valid fields:.*blur_prob"):
        view_recipe("simclr", SIZE, blurr_prob=0.1)


@pytest.mark.parametrize("field, value", [
    ("min_scale", 0.0), ("min_scale", 1.5), ("max_ratio", 0.5), ("hue", 0.7), ("brightness", -0.1),
    ("flip_prob", 1.5), ("grey_prob", "half"), ("jitter_order", "sorted"), ("blur_kernel", 4),
    ("blur_kernel", 99), ("blur_sigma", (2.0, 0.1)), ("mean", (0.5, 0.5)), ("std", (0.0, 1.0, 1.0)),
    ("jitter_strength", 3.0),
])
def test_bad_values_name_the_field(field: str, value) -> None:
    with pytest.raises(UserError, match=field.split("_")[0]):
        view_recipe("simclr", SIZE, **{field: value})


def test_bad_image_size_and_mismatched_images() -> None:
    with pytest.raises(UserError, match="image_size"):
        view_recipe("cifar", 0)
    with pytest.raises(UserError, match="image_size"):
        view_recipe("cifar", "32")
    with pytest.raises(UserError, match="recipe is for 32 px.*16 px"):  # larger images are cropped down
        make_views(images(size=16), view_recipe("cifar", SIZE), generator())
    with pytest.raises(UserError, match="shape"):
        make_views(images()[0], view_recipe("cifar", SIZE), generator())
    with pytest.raises(UserError, match="count"):
        make_views(images(), view_recipe("cifar", SIZE), generator(), count=0)
