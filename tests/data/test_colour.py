"""Colour spaces: Lab of reference colours, sRGB -> Lab -> sRGB within one level, the lightness input, the
batched torch conversion against the numpy one."""

from __future__ import annotations

import numpy as np
import torch

from ssl_cli.data.colour import lab_to_rgb, lightness_input, rgb_to_lab, rgb_to_lab_batch


def test_lab_of_reference_colours():
    # CIE Lab (D65) of sRGB white, black, red, green and blue, as colour-science tables give them.
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    want = [[100, 0, 0], [0, 0, 0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
            [32.2970, 79.1875, -107.8602]]
    np.testing.assert_allclose(rgb_to_lab(rgb)[0], want, atol=2e-3)
    np.testing.assert_allclose(rgb_to_lab(rgb / 255.0), rgb_to_lab(rgb))  # float input in [0, 1]


def test_rgb_lab_rgb_round_trip_within_one_level():
    colours = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    colours[0, :8] = [[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]  # the RGB cube's corners
    lab = rgb_to_lab(colours)
    assert lab.shape == colours.shape and lab[..., 0].min() >= 0 and lab[..., 0].max() <= 100
    assert np.abs(lab[..., 1:]).max() <= 110
    assert np.abs(lab_to_rgb(lab) - colours / 255.0).max() < 1 / 255


def test_lightness_input_is_l_in_minus_one_to_one_on_three_channels():
    lab = rgb_to_lab(np.array([[[0, 0, 0], [255, 255, 255]], [[200, 30, 60], [10, 200, 90]]], dtype=np.uint8))
    inputs = lightness_input(lab)
    assert inputs.shape == (3, 2, 2) and inputs.dtype == torch.float32
    assert torch.equal(inputs[0], inputs[2])
    np.testing.assert_allclose(inputs[1].numpy(), lab[..., 0] / 50 - 1, atol=1e-6)
    assert inputs[0, 0, 0] == -1 and abs(inputs[0, 0, 1] - 1) < 1e-5


def test_batched_torch_lab_equals_the_numpy_lab():
    colours = np.random.default_rng(1).integers(0, 256, (4, 30, 20, 3), dtype=np.uint8)
    colours[0, 0, :8] = [[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]
    colours[2, :, :] = np.arange(20, dtype=np.uint8)[None, :, None]  # greys, dark ones in the linear branch
    want = np.stack([rgb_to_lab(image) for image in colours])  # (B, H, W, 3)
    batch = torch.from_numpy(colours).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8, as the loader delivers
    got = rgb_to_lab_batch(batch)
    assert got.shape == (4, 3, 30, 20) and got.dtype == torch.float64
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(rgb_to_lab_batch(batch.double() / 255.0).numpy(), got.numpy(), rtol=0, atol=1e-10)
    single = rgb_to_lab_batch(batch.float() / 255.0, dtype=torch.float32)  # float32: to float32 rounding
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.permute(0, 2, 3, 1).numpy(), want, rtol=0, atol=1e-3)
