"""Colour spaces: sRGB <-> CIE Lab (D65), and the lightness input a colorization trunk sees.

Data-level conversions used by the colorization task (its samples) and by `data.transforms` (the
input `ssl extract` feeds such a trunk), so neither reaches into the other. `rgb_to_lab` is the
per-image numpy definition; `rgb_to_lab_batch` is the same conversion in torch on channel-first
batches (what the colorization task runs on the training device), equal to it within float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

# sRGB (D65) linear RGB -> XYZ, and the D65 reference white.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = _RGB_TO_XYZ.sum(axis=1)  # XYZ of RGB (1, 1, 1): (0.9505, 1.0, 1.0889)
_DELTA = 6.0 / 29.0


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (H, W, 3), uint8 in [0, 255] or float in [0, 1] -> CIE Lab (H, W, 3) float64.

    L is in [0, 100]; a and b lie within about [-110, 110] for sRGB colours.
    """
    rgb = np.asarray(rgb)
    values = rgb / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    linear = np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _DELTA ** 3, np.cbrt(xyz), xyz / (3 * _DELTA ** 2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def rgb_to_lab_batch(rgb: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """sRGB (..., 3, H, W), uint8 in [0, 255] or float in [0, 1] -> CIE Lab (..., 3, H, W) in `dtype`.

    `rgb_to_lab` channel-first and in torch: float64 by default, so it agrees with the numpy conversion to
    rounding (about 1e-13) and the ab classes cut from it are the same except where a value sits on a bin
    edge (grey pixels: a = b = 0 up to rounding noise, which either side of 0 it falls on is not defined).
    """
    values = rgb.to(dtype) / 255.0 if rgb.dtype == torch.uint8 else rgb.to(dtype)
    linear = torch.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)
    matrix = torch.as_tensor(_RGB_TO_XYZ / _WHITE[:, None], dtype=dtype, device=rgb.device)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, linear)
    cube_root = xyz.clamp(min=_DELTA ** 3) ** (1.0 / 3.0)
    f = torch.where(xyz > _DELTA ** 3, cube_root, xyz / (3 * _DELTA ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab (H, W, 3) -> sRGB (H, W, 3) float64 in [0, 1] (colours outside the gamut are clipped)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4.0 / 29.0)) * _WHITE
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def lightness_input(lab: np.ndarray) -> torch.Tensor:
    """(H, W, 3) Lab -> (3, H, W) float32: L / 50 - 1 in [-1, 1], repeated to the trunk's 3 channels.

    What a colorization trunk sees in training and, through `data.transforms.LightnessInput`, in `ssl extract`.
    """
    lightness = torch.from_numpy((lab[..., 0] / 50.0 - 1.0).astype(np.float32))
    return lightness.unsqueeze(0).expand(3, -1, -1).contiguous()
