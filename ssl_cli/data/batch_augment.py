"""Training augmentation applied to a whole batch on the training device, seeded per step.

The per-image data path stays deterministic (load, resize to the training size, uint8), and every
random choice is drawn here from a generator seeded by (seed, epoch, step): the same batch gets the
same augmentation in any worker layout and after a resume, and the cost is one `grid_sample` per
batch instead of a PIL pipeline per image (which, on a 2-core machine, competes with training).

One affine warp per image covers the three parts of the small-image recipe: a random resized crop
(area fraction in [min_scale, 1], aspect ratio in [3/4, 4/3]), a shift of up to `shift` pixels, and
a horizontal flip. Pixels the warp brings in from outside the image are black (0 before
normalisation), as a padded random crop gives. Colour jitter (brightness, contrast, saturation by
factors in [1 - s, 1 + s]) and random grey-scale are per-image blends, also batched.

The stored images may be larger than the training side `size` (`resized.stored_side`: a recipe with
random resized crops keeps them at up to twice it), so that a crop comes from the stored image rather
than from a centre square already shrunk to the training size: the warp then samples the crop at
k x k points per output pixel (k = ceil(stored / size)) and averages them, an anti-aliased resize in
the same one `grid_sample`. At the training size (k = 1) it is the plain warp, pixel for pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F


def step_generator(seed: int, epoch: int, step: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by (seed, epoch, step): a pure function of the position in training."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + step & 0x7FFF_FFFF_FFFF)
    return generator


@dataclass(frozen=True)
class BatchAugment:
    """uint8 (B, C, T, T) images -> float (B, C, S, S) augmented and normalised with mean/std.

    size: the output side S (None: the input's, T); a larger input is cropped and resized down to it.
    min_scale: smallest area fraction of the random resized crop (1.0: no crop).
    shift: largest translation in pixels of the output, each axis (0: none).
    flip: random horizontal flips.
    """

    mean: Sequence[float]
    std: Sequence[float]
    min_scale: float = 1.0
    shift: float = 0.0
    flip: bool = True
    grayscale_prob: float = 0.0
    color_jitter: float = 0.0
    # what the network was trained to see: "mean_std" (the usual), "per_image" (zero mean, unit std per
    # image, as jigsaw tiles were seen), "lightness" (CIE L / 50 - 1 in 3 channels, a colorization trunk)
    # or "sobel" (the Sobel responses of the grey image, DeepCluster's optional input)
    normalise: str = "mean_std"
    size: int | None = None

    @property
    def identity(self) -> bool:
        return self.min_scale >= 1.0 and self.shift <= 0 and not self.flip and not self.grayscale_prob \
            and not self.color_jitter

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        if generator is not None and not self.identity:
            # k x k samples per output pixel, averaged, when the stored images are larger (k = 1: the plain warp)
            k = max(1, math.ceil(max(x.shape[-2:]) / self.size)) if self.size else 1
            grid = self.grid(x.shape, x.device, generator, self.size, k)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = F.avg_pool2d(x, k) if k > 1 else x
            x = self.colour(x, generator)
        elif self.size and tuple(x.shape[-2:]) != (self.size, self.size):  # no warp drawn: the whole stored image
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if self.normalise == "per_image":
            flat = x.flatten(1)
            return (x - flat.mean(1).view(-1, 1, 1, 1)) / (flat.std(1).view(-1, 1, 1, 1) + 1e-5)
        if self.normalise == "lightness":
            return lightness(x)
        if self.normalise == "sobel":
            return sobel(x)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def colour(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> colour-jittered and randomly grey, still in [0, 1]."""
        if not self.color_jitter and not self.grayscale_prob:
            return x
        batch = x.shape[0]

        def factor() -> torch.Tensor:
            draw = torch.rand(batch, 1, 1, 1, device=x.device, generator=generator)
            return 1 - self.color_jitter + 2 * self.color_jitter * draw

        def grey(image: torch.Tensor) -> torch.Tensor:
            weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            return (image * weights).sum(1, keepdim=True).expand_as(image)

        if self.color_jitter:
            x = (x * factor()).clamp(0, 1)  # brightness
            mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (mean + (x - mean) * factor()).clamp(0, 1)  # contrast
            x = (grey(x) + (x - grey(x)) * factor()).clamp(0, 1)  # saturation
        if self.grayscale_prob:
            chosen = torch.rand(batch, 1, 1, 1, device=x.device, generator=generator) < self.grayscale_prob
            x = torch.where(chosen, grey(x), x)
        return x

    def grid(self, shape: torch.Size, device: torch.device, generator: torch.Generator, size: int | None = None,
             samples: int = 1) -> torch.Tensor:
        """(B, k S, k S, 2) sampling grid of one random affine warp per image (normalised coordinates) of
        images of `shape` (B, C, T, T) to side S = `size` (default T), k = `samples` points per output pixel
        and axis. The draws do not depend on T or k, so a batch stored larger gets the same crops."""
        batch = shape[0]
        height, width = (size, size) if size else tuple(shape[-2:])

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, device=device, generator=generator)

        area = uniform(self.min_scale, 1.0)
        log_ratio = uniform(math.log(3 / 4), math.log(4 / 3)) if self.min_scale < 1.0 else torch.zeros(batch, device=device)
        ratio = log_ratio.exp()
        # Crop sides as fractions of the image (capped at 1), then a crop centre that keeps the crop inside.
        scale_x = (area * ratio).sqrt().clamp(max=1.0)
        scale_y = (area / ratio).sqrt().clamp(max=1.0)
        centre_x = (1 - scale_x) * uniform(-1.0, 1.0)
        centre_y = (1 - scale_y) * uniform(-1.0, 1.0)
        if self.shift > 0:
            centre_x = centre_x + uniform(-1.0, 1.0).mul(self.shift).round() * 2 / width
            centre_y = centre_y + uniform(-1.0, 1.0).mul(self.shift).round() * 2 / height
        if self.flip:
            sign = torch.where(torch.rand(batch, device=device, generator=generator) < 0.5, -1.0, 1.0)
            scale_x = scale_x * sign
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = scale_x, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = scale_y, centre_y
        return F.affine_grid(theta, [batch, shape[1], height * samples, width * samples], align_corners=False)


def lightness(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> (B, 3, H, W) CIE L / 50 - 1 repeated in 3 channels (D65 white, Y = 1),
    the input `data.colour.lightness_input` gives a colorization trunk."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    y = (linear * torch.tensor([0.2126729, 0.7151522, 0.0721750], device=rgb.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    delta = 6.0 / 29.0
    f = torch.where(y > delta ** 3, y.clamp(min=1e-12) ** (1 / 3), y / (3 * delta ** 2) + 4.0 / 29.0)
    return ((116.0 * f - 16.0) / 50.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))


def sobel(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, H, W): the horizontal and vertical Sobel responses of the grey
    image (luma 0.299/0.587/0.114, replicated border) and their magnitude, DeepCluster's Sobel input
    (its two filter channels; the magnitude fills the third, so 3-channel archs take it unchanged)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    grey = (rgb * weights).sum(1, keepdim=True)
    kx = torch.tensor(SOBEL_X, device=rgb.device, dtype=rgb.dtype)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    responses = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return torch.cat([responses, responses.pow(2).sum(1, keepdim=True).sqrt()], dim=1)


def normalise_mode(input_mode: str, per_image: bool) -> str:
    """BatchAugment's `normalise` for a network's recorded input mode and per-image flag."""
    if input_mode in ("lightness", "sobel"):
        return input_mode
    return "per_image" if per_image else "mean_std"
