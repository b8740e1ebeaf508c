"""Multi-view augmentation of SimCLR and MoCo v2, applied to a whole batch on the training device.

Contrastive methods see two (or more) independently augmented views of every image. As in
`batch_augment`, the per-image data path stays deterministic (uint8, training size) and every random
choice is drawn here from one `torch.Generator` (seed it per step with
`batch_augment.step_generator`), so the views are reproducible and a resumed run sees the same ones.

One view is, per image and in this order (SimCLR's `preprocess_for_train`, MoCo v2's `aug_plus`):

1. random resized crop (area fraction in [min_scale, max_scale], aspect ratio in [min_ratio,
   max_ratio], ten tries then the whole image, as torchvision's `RandomResizedCrop`) and a
   horizontal flip, together as one affine `grid_sample` for the batch (bilinear; the crop is never
   larger than the image, so no anti-aliasing is needed). MoCo v2 flips last; a flip commutes with
   everything after it, so folding it into the warp changes nothing;
2. colour jitter with probability `jitter_prob`: brightness, contrast and saturation by factors in
   [max(0, 1 - v), 1 + v], hue by a rotation of up to `hue` of a turn, in a random order per image
   (torchvision's `ColorJitter` order) or the fixed order brightness, contrast, saturation, hue,
   clamped to [0, 1] after each as torchvision does;
3. greyscale with probability `grey_prob` (luma 0.299 R + 0.587 G + 0.114 B in every channel);
4. Gaussian blur with probability `blur_prob`, sigma uniform in `blur_sigma` (pixels), a separable
   kernel of `blur_kernel` taps (odd, about 10% of the image side as SimCLR sets it, reflect padding);
5. solarize with probability `solarize_prob` (pixels >= threshold become 1 - pixel; BYOL's second
   view uses it, the SimCLR and MoCo recipes do not);
6. normalisation with mean/std.

Hue is a rotation of the chroma plane of YIQ, not a shift of HSV hue: each of the four jitter
operations is then one 3x3 colour matrix (plus an offset for contrast) per image, so a jitter step
is one batched matmul for the whole batch. The rotation keeps luma, so grey pixels stay exactly
grey; unlike an HSV shift it can leave the RGB cube for saturated colours, which the clamp after it
catches. Jitter works in float, where torchvision's PIL path rounds to uint8 after each step.

Images with one channel are accepted: saturation, hue and greyscale are identities on them and are
skipped; the `grey` preset leaves them off for three-channel grey content too.

The images may be stored larger than the recipe's `image_size` (`resized.stored_side` keeps them at up
to twice it when the source has the pixels), so the crop comes from the stored image, not from a centre
square already shrunk to the training size: the warp samples each output pixel at k x k points
(k = ceil(stored / image_size)) and averages them, an anti-aliased resize in the same `grid_sample`.
At `image_size` (k = 1) it is the plain warp.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.nn import functional as F

from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma: YIQ's Y row, also the weights of the greyscale step
JITTER_ORDERS = ("random", "fixed")
CROP_TRIES = 10  # as torchvision's RandomResizedCrop, before it falls back to the whole image
SMALL_IMAGE = 32  # at or below this side, the small-image presets leave blur out (SimCLR on CIFAR)


def blur_kernel_size(image_size: int) -> int:
    """Taps of the blur kernel for `image_size`-pixel images: SimCLR's 10% of the side made odd
    (radius = int(0.1 S) // 2; 23 at 224 px, 9 at 96 px), at least 3 (28-32 px give 3)."""
    return max(3, 2 * (int(0.1 * image_size) // 2) + 1)


@dataclass(frozen=True)
class ViewRecipe:
    """Everything one augmented view depends on. Defaults are SimCLR's ImageNet recipe (s = 1.0).

    image_size: side S of the images this recipe is for (the blur kernel follows it).
    min_scale, max_scale: area fraction of the random resized crop.
    min_ratio, max_ratio: aspect ratio (width / height) of the crop.
    flip_prob: probability of a horizontal flip.
    brightness, contrast, saturation: jitter factors are uniform in [max(0, 1 - v), 1 + v] (0: off).
    hue: the chroma rotation is uniform in [-hue, hue] of a turn, at most 0.5 (0: off).
    jitter_prob: probability that an image gets the colour jitter at all.
    jitter_order: "random" (a new order of the four operations per image) or "fixed" (brightness,
        contrast, saturation, hue).
    grey_prob: probability of greyscale.
    blur_prob, blur_sigma: probability of a Gaussian blur and its sigma range in pixels.
    blur_kernel: taps of the blur kernel, odd; None: `blur_kernel_size(image_size)`.
    solarize_prob, solarize_threshold: probability of solarizing and the level (in [0, 1]) from
        which pixels are inverted.
    mean, std: normalisation per channel (one value or one per channel of the images).
    """

    image_size: int
    min_scale: float = 0.08
    max_scale: float = 1.0
    min_ratio: float = 3 / 4
    max_ratio: float = 4 / 3
    flip_prob: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_prob: float = 0.8
    jitter_order: str = "random"
    grey_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        numbers = ("min_scale", "max_scale", "min_ratio", "max_ratio", "brightness", "contrast", "saturation",
                   "hue", "solarize_threshold")
        for name in numbers + _PROBABILITIES:
            _check_number(name, getattr(self, name))
        for name in _PROBABILITIES:
            _check_range(name, getattr(self, name), 0.0, 1.0)
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise UserError(f"view recipe: need 0 < min_scale <= max_scale <= 1, "
                            f"got min_scale={self.min_scale} max_scale={self.max_scale}")
        if not 0 < self.min_ratio <= self.max_ratio:
            raise UserError(f"view recipe: need 0 < min_ratio <= max_ratio, got min_ratio={self.min_ratio} "
                            f"max_ratio={self.max_ratio}")
        for name in ("brightness", "contrast", "saturation"):
            _check_range(name, getattr(self, name), 0.0, math.inf)
        _check_range("hue", self.hue, 0.0, 0.5)
        _check_range("solarize_threshold", self.solarize_threshold, 0.0, 1.0)
        if self.jitter_order not in JITTER_ORDERS:
            raise UserError(f"view recipe: jitter_order must be one of {', '.join(JITTER_ORDERS)}, "
                            f"got {self.jitter_order!r}")
        sigma = _as_floats("blur_sigma", self.blur_sigma)
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            raise UserError(f"view recipe: blur_sigma must be two numbers (low, high) with 0 < low <= high, "
                            f"got {self.blur_sigma!r}")
        object.__setattr__(self, "blur_sigma", sigma)
        kernel = blur_kernel_size(self.image_size) if self.blur_kernel is None else self.blur_kernel
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 3 or kernel % 2 == 0 \
                or kernel // 2 >= self.image_size:
            raise UserError(f"view recipe: blur_kernel must be an odd integer >= 3 whose radius is below the "
                            f"image side {self.image_size}, got {kernel!r} (leave it unset for "
                            f"{blur_kernel_size(self.image_size)}, 10% of the side)")
        object.__setattr__(self, "blur_kernel", kernel)
        mean, std = _as_floats("mean", self.mean), _as_floats("std", self.std)
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise UserError(f"view recipe: mean and std need the same length, 1 or 3 (one per channel), got "
                            f"{len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise UserError(f"view recipe: every std must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def jitters(self) -> bool:
        return self.jitter_prob > 0 and any((self.brightness, self.contrast, self.saturation, self.hue))


_PROBABILITIES = ("flip_prob", "jitter_prob", "grey_prob", "blur_prob", "solarize_prob")


def _check_image_size(image_size: Any) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise UserError(f"view recipe: image_size must be an integer of at least 4 pixels, "
                        f"got {image_size!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"view recipe: {name} must be a number, got {value!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UserError(f"view recipe: {name} must be in [{low}, {high}], got {value}")


def _as_floats(name: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,)
    try:
        floats = tuple(values)
    except TypeError:
        raise UserError(f"view recipe: {name} must be a list of numbers, got {values!r}") from None
    for value in floats:
        _check_number(name, value)
    return tuple(float(value) for value in floats)


# ---------------------------------------------------------------------------------------------------
# Presets: the recipes of the papers, at a given image size.


def _simclr(image_size: int) -> dict[str, Any]:
    """SimCLR (Chen 2020) on ImageNet: crop 0.08-1, flip, jitter s = 1.0 (0.8/0.8/0.8/0.2) with p 0.8,
    grey 0.2, blur p 0.5 with a kernel of 10% of the side. Use `cifar` for 32 px images."""
    return {"min_scale": 0.08, **jitter_strength(1.0), "jitter_prob": 0.8, "grey_prob": 0.2, "blur_prob": 0.5}


def _moco2(image_size: int) -> dict[str, Any]:
    """MoCo v2 (Chen 2020c, `aug_plus`): crop 0.2-1, jitter 0.4/0.4/0.4/0.1 with p 0.8, grey 0.2,
    blur p 0.5 (sigma 0.1-2), flip."""
    return {"min_scale": 0.2, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1,
            "jitter_prob": 0.8, "grey_prob": 0.2, "blur_prob": 0.5}


def _cifar(image_size: int) -> dict[str, Any]:
    """SimCLR's CIFAR-10 recipe (its README: --color_jitter_strength=0.5 --use_blur=False): crop 0.08-1,
    flip, jitter s = 0.5 (0.4/0.4/0.4/0.1) with p 0.8, grey 0.2. No blur at <= 32 px, as SimCLR leaves
    it out on CIFAR-10 (a sigma of up to 2 px removes most of the little detail a 32 px image has);
    blur p 0.5 above 32 px (STL-10 at 96 px, say)."""
    return {"min_scale": 0.08, **jitter_strength(0.5), "jitter_prob": 0.8, "grey_prob": 0.2,
            "blur_prob": 0.0 if image_size <= SMALL_IMAGE else 0.5}


def _grey(image_size: int) -> dict[str, Any]:
    """Grey content such as Fashion-MNIST: crop 0.3-1 (objects fill a 28 px frame; 0.08 of it is a few
    pixels of texture), flip, brightness/contrast 0.4 with p 0.8. Saturation and hue are identities on
    grey pixels and greyscale is one, so they are off (they would only cost time); no blur at <= 32 px
    (as SimCLR on CIFAR), p 0.5 above."""
    return {"min_scale": 0.3, "brightness": 0.4, "contrast": 0.4, "saturation": 0.0, "hue": 0.0,
            "jitter_prob": 0.8, "grey_prob": 0.0, "blur_prob": 0.0 if image_size <= SMALL_IMAGE else 0.5}


PRESETS: dict[str, Callable[[int], dict[str, Any]]] = {
    "simclr": _simclr, "moco2": _moco2, "cifar": _cifar, "grey": _grey,
}


def jitter_strength(s: float) -> dict[str, float]:
    """SimCLR's colour distortion of strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s."""
    _check_number("jitter_strength", s)
    if s < 0 or 0.2 * s > 0.5:
        raise UserError(f"view recipe: jitter_strength must be in [0, 2.5] (hue 0.2 s is at most 0.5), "
                        f"got {s}")
    return {"brightness": 0.8 * s, "contrast": 0.8 * s, "saturation": 0.8 * s, "hue": 0.2 * s}


def view_recipe(preset: str, image_size: int, **overrides: Any) -> ViewRecipe:
    """The named preset at `image_size`, with any field replaced by `overrides`.

    `jitter_strength=s` sets brightness/contrast/saturation/hue to SimCLR's split (0.8 s, 0.2 s);
    explicit brightness=... etc. given with it win. Raises UserError on an unknown preset or field
    (naming the valid ones) and on a value out of range (naming the field and its range).
    """
    if preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown view preset {preset!r}{hint}; valid presets: {', '.join(PRESETS)}")
    names = [field.name for field in fields(ViewRecipe) if field.name != "image_size"]
    unknown = sorted(set(overrides) - set(names) - {"jitter_strength"})
    if unknown:
        raise UserError(f"unknown view recipe field(s) {', '.join(unknown)}; valid fields: "
                        f"{', '.join(names + ['jitter_strength'])}")
    _check_image_size(image_size)
    values = PRESETS[preset](image_size)
    if "jitter_strength" in overrides:
        values.update(jitter_strength(overrides.pop("jitter_strength")))
    values.update(overrides)
    return ViewRecipe(image_size=image_size, **values)


# ---------------------------------------------------------------------------------------------------
# The views.


def make_views(images: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator,
               count: int = 2) -> list[torch.Tensor]:
    """uint8 (B, C, T, T) images (T >= S) -> `count` independently augmented views, each float (B, C, S, S)
    normalised, S = `recipe.image_size`.

    All views are made in one pass over the (count * B) batch, so view k is rows k*B..(k+1)*B of
    `augment(images repeated count times)`; `make_views(x, r, g, 1)[0]` equals `augment(x, r, g)`.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"views: count must be a positive integer, got {count!r}")
    check_images(images, recipe, generator)
    if count == 1:
        return [augment(images, recipe, generator)]
    return list(augment(images.repeat(count, 1, 1, 1), recipe, generator).split(images.shape[0]))


def augment(images: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, T, T) (or float in [0, 1]) -> one augmented view, float (B, C, S, S) normalised.

    C is 1 or 3, S is `recipe.image_size` and T >= S (larger: crops come from the stored image);
    `generator` lives on the images' device.
    """
    x = unit_float(images, recipe, generator)
    size = recipe.image_size
    if recipe.min_scale < 1 or recipe.flip_prob > 0:
        x = warp(x, crop_flip_theta(x.shape[0], recipe, generator, x.device), size)
    elif x.shape[2] != size:  # no warp: the whole stored image at the recipe's size
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = colour_jitter(x, recipe, generator)
    x = random_grey(x, recipe.grey_prob, generator)
    x = random_blur(x, recipe, generator)
    x = random_solarize(x, recipe.solarize_prob, recipe.solarize_threshold, generator)
    return normalise(x, recipe.mean, recipe.std)


def unit_float(images: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator) -> torch.Tensor:
    """Checks the batch against the recipe; uint8 (B, C, T, T) -> float (B, C, T, T) in [0, 1] (a copy)."""
    check_images(images, recipe, generator)
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float().clone()


def check_images(images: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator) -> None:
    """Raises UserError, saying what was expected, unless `images` is a uint8 or float (B, C, T, T) batch
    with C 1 or 3 and T at least the recipe's size; ValueError when the generator is on another device."""
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise UserError(f"views: expected images of shape (B, C, S, S) with C 1 or 3, "
                        f"got {tuple(images.shape)}")
    if images.shape[2] < recipe.image_size:
        raise UserError(f"views: the recipe is for {recipe.image_size} px images but these are "
                        f"{images.shape[2]} px; build it with view_recipe(preset, {images.shape[2]}) so the "
                        "blur kernel follows the size")
    if len(recipe.mean) not in (1, images.shape[1]):
        raise UserError(f"views: the recipe normalises {len(recipe.mean)} channels but the images have "
                        f"{images.shape[1]}; set mean and std to one value or one per channel")
    if generator.device.type != images.device.type:
        raise ValueError(f"views: the generator is on {generator.device} but the images are on "
                         f"{images.device}; make it with step_generator(..., device=images.device)")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise UserError(f"views: expected uint8 images (or float in [0, 1]), got {images.dtype}")


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _chosen(probability: float, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B,) bool: which images get a step applied with `probability`."""
    return torch.rand(batch, generator=generator, device=device) < probability


def crop_flip_theta(batch: int, recipe: ViewRecipe, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """(B, 2, 3) affine maps (output -> input, normalised coordinates) of a random resized crop and flip
    per image of a square batch."""
    area = _uniform(recipe.min_scale, recipe.max_scale, (batch, CROP_TRIES), generator, device)
    ratio = _uniform(math.log(recipe.min_ratio), math.log(recipe.max_ratio), (batch, CROP_TRIES), generator,
                     device).exp()
    width, height = (area * ratio).sqrt(), (area / ratio).sqrt()  # fractions of the side
    fits = (width <= 1) & (height <= 1)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision takes it
    width, height = width.gather(1, first).squeeze(1), height.gather(1, first).squeeze(1)
    # No try fits: the whole image, its aspect ratio clamped into range (torchvision's fallback).
    whole = min(max(1.0, recipe.min_ratio), recipe.max_ratio)
    none_fit = ~fits.any(1)
    width = torch.where(none_fit, min(1.0, whole), width)
    height = torch.where(none_fit, min(1.0, 1 / whole), height)
    centre_x = (1 - width) * _uniform(-1.0, 1.0, (batch,), generator, device)
    centre_y = (1 - height) * _uniform(-1.0, 1.0, (batch,), generator, device)
    sign = torch.where(_chosen(recipe.flip_prob, batch, generator, device), -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """float (B, C, T, T), (B, 2, 3) affine maps -> (B, C, S, S) resampled bilinearly (one grid_sample),
    S = `size` (default T); from larger images each output pixel averages k x k samples, k = ceil(T / S)."""
    size = size or x.shape[2]
    k = max(1, math.ceil(x.shape[2] / size))
    grid = affine_grid(theta, size * k, size * k)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(x, k) if k > 1 else x


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) affine maps -> (B, H, W, 2) sampling grid, as `F.affine_grid(..., align_corners=False)`
    gives, built by broadcasting (on a CPU about 5x faster than its batched matmul at 32 px)."""
    def centres(size: int) -> torch.Tensor:
        return (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1

    xs, ys = centres(width).view(1, 1, width), centres(height).view(1, height, 1)
    a = theta.view(-1, 6, 1, 1).unbind(1)
    return torch.stack((a[0] * xs + a[1] * ys + a[2], a[3] * xs + a[4] * ys + a[5]), dim=-1)


def _yiq_hue_basis() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three (3, 3) RGB matrices A, Bc, Bs with hue rotation by angle t = A + cos(t) Bc + sin(t) Bs
    (a rotation of YIQ's I-Q plane, Y kept), computed in float64."""
    rgb_to_yiq = torch.tensor([LUMA, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)], dtype=torch.float64)
    yiq_to_rgb = torch.linalg.inv(rgb_to_yiq)
    keep_y = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    cos_part = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    sin_part = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    keep, cos, sin = (yiq_to_rgb @ part @ rgb_to_yiq for part in (keep_y, cos_part, sin_part))
    return keep, cos, sin


_HUE_BASIS = _yiq_hue_basis()


def hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """(B,) hue rotations in turns (0.5: half a turn) -> (B, 3, 3) RGB matrices rotating YIQ's chroma."""
    keep, cos_part, sin_part = (part.to(turns.device, torch.float32) for part in _HUE_BASIS)
    angle = (2 * math.pi * turns).view(-1, 1, 1)
    return keep + angle.cos() * cos_part + angle.sin() * sin_part


def saturation_matrices(factors: torch.Tensor) -> torch.Tensor:
    """(B,) saturation factors -> (B, 3, 3) RGB matrices blending each pixel with its luma
    (0: grey, 1: unchanged)."""
    luma = torch.tensor(LUMA, device=factors.device).expand(3, 3)
    eye = torch.eye(3, device=factors.device)
    factors = factors.view(-1, 1, 1)
    return factors * eye + (1 - factors) * luma


def apply_colour(x: torch.Tensor, matrices: torch.Tensor,
                 offsets: torch.Tensor | None = None) -> torch.Tensor:
    """float (B, C, H, W), (B, C, C) colour matrices, optional (B, 1) offsets -> (B, C, H, W) M x + offset,
    clamped to [0, 1]."""
    flat = x.flatten(2)
    if offsets is None:
        return torch.bmm(matrices, flat).clamp_(0, 1).view_as(x)
    return torch.baddbmm(offsets.unsqueeze(2), matrices, flat).clamp_(0, 1).view_as(x)


def colour_jitter(x: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator) -> torch.Tensor:
    """float (B, C, H, W) in [0, 1] -> colour-jittered (B, C, H, W) in [0, 1], per-image random factors."""
    if not recipe.jitters:
        return x
    factors, order = jitter_parameters(x.shape[0], x.shape[1], recipe, generator, x.device)
    return apply_jitter(x, factors, order)


def jitter_parameters(batch: int, channels: int, recipe: ViewRecipe, generator: torch.Generator,
                      device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The random part of the colour jitter: {operation: (B,) factors} for the operations the recipe
    uses, in the fixed order brightness, contrast, saturation, hue (strength 0 is left out, and so are
    saturation and hue on one channel), and (B, K) the order each image gets them in (indices into
    that dict). Images without jitter (1 - jitter_prob of them) get identity factors: 1 (hue: 0 turns)."""
    applied = _chosen(recipe.jitter_prob, batch, generator, device)
    factors: dict[str, torch.Tensor] = {}
    for name in ("brightness", "contrast", "saturation", "hue"):
        strength = getattr(recipe, name)
        if strength <= 0 or (channels == 1 and name in ("saturation", "hue")):
            continue
        if name == "hue":
            drawn = _uniform(-strength, strength, (batch,), generator, device)
            factors[name] = torch.where(applied, drawn, 0.0)
        else:
            drawn = _uniform(max(0.0, 1 - strength), 1 + strength, (batch,), generator, device)
            factors[name] = torch.where(applied, drawn, 1.0)
    if recipe.jitter_order == "random" and len(factors) > 1:
        order = torch.rand(batch, len(factors), generator=generator, device=device).argsort(1)
    else:
        order = torch.arange(len(factors), device=device).expand(batch, -1)
    return factors, order


def apply_jitter(x: torch.Tensor, factors: dict[str, torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) in [0, 1], {operation: (B,) factors}, (B, K) order -> (B, C, H, W) in [0, 1].

    Every operation is a per-image colour matrix (brightness b I; contrast c I plus an offset, the
    image's mean luma times 1 - c; saturation a blend with luma; hue a YIQ chroma rotation). Step k
    applies to each image the operation at position k of its order, as one batched matmul for the
    whole batch, then clamps to [0, 1] as torchvision does after each operation.
    """
    batch, channels = x.shape[:2]
    device = x.device
    names = list(factors)
    luma = torch.tensor(LUMA, device=device) if channels == 3 else torch.ones(1, device=device)
    eye = torch.eye(channels, device=device)
    for step in range(len(names)):
        here = {name: order[:, step] == index for index, name in enumerate(names)}
        scale = torch.ones(batch, device=device)
        matrices = eye.expand(batch, -1, -1)
        offsets = None
        if "brightness" in here:
            scale = torch.where(here["brightness"], factors["brightness"], scale)
        if "contrast" in here:
            contrast = torch.where(here["contrast"], factors["contrast"], 1.0)
            scale = scale * contrast
            mean_luma = x.mean(dim=(2, 3)) @ luma  # (B,) the image's mean grey level, as in torchvision
            offsets = ((1 - contrast) * mean_luma).unsqueeze(1)
        if "saturation" in here:
            matrices = saturation_matrices(torch.where(here["saturation"], factors["saturation"], 1.0))
        if "hue" in here:
            matrices = matrices @ hue_matrices(torch.where(here["hue"], factors["hue"], 0.0))
        x = apply_colour(x, scale.view(-1, 1, 1) * matrices, offsets)
    return x


def grey(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) -> (B, 3, H, W) luma in every channel."""
    weights = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True).expand_as(x)


def random_grey(x: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """float (B, C, H, W) -> same with each image made grey with `probability` (one channel: unchanged)."""
    if probability <= 0 or x.shape[1] == 1:
        return x
    rows = _chosen(probability, x.shape[0], generator, x.device).nonzero().squeeze(1)
    return x.index_copy(0, rows, grey(x.index_select(0, rows)).contiguous()) if rows.numel() else x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """float (B, C, H, W), (B,) sigmas in pixels -> (B, C, H, W) blurred by a separable `kernel`-tap
    Gaussian per image (two grouped conv2d over the B*C planes, reflect padding)."""
    batch, channels, height, width = x.shape
    radius = kernel // 2
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-(taps ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (B*C, kernel)
    planes = F.pad(x.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    planes = F.conv2d(planes, weights.view(-1, 1, 1, kernel), groups=batch * channels)
    planes = F.conv2d(planes, weights.view(-1, 1, kernel, 1), groups=batch * channels)
    return planes.view(batch, channels, height, width)


def random_blur(x: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator) -> torch.Tensor:
    """float (B, C, H, W) -> same with each image blurred with `recipe.blur_prob`, sigma uniform in
    `recipe.blur_sigma`; only the chosen images are convolved."""
    if recipe.blur_prob <= 0:
        return x
    batch = x.shape[0]
    chosen = _chosen(recipe.blur_prob, batch, generator, x.device)
    sigma = _uniform(*recipe.blur_sigma, (batch,), generator, x.device)
    rows = chosen.nonzero().squeeze(1)
    if rows.numel():
        x = x.index_copy(0, rows, gaussian_blur(x.index_select(0, rows), sigma[rows], recipe.blur_kernel))
    return x


def random_solarize(x: torch.Tensor, probability: float, threshold: float,
                    generator: torch.Generator) -> torch.Tensor:
    """float (B, C, H, W) in [0, 1] -> same with each image solarized (pixel p >= threshold becomes 1 - p)
    with `probability`."""
    if probability <= 0:
        return x
    chosen = _chosen(probability, x.shape[0], generator, x.device).view(-1, 1, 1, 1)
    return torch.where(chosen & (x >= threshold), 1 - x, x)


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float (B, C, H, W) -> (x - mean) / std per channel."""
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def views_per_second(recipe: ViewRecipe, size: int, batch: int, seconds: float = 3.0, count: int = 2,
                     threads: int | None = 1) -> float:
    """Source images per second that `make_views` turns into `count` views each, on the CPU, measured
    over about `seconds` on random uint8 (batch, 3, size, size) images (`threads`: torch threads, None
    keeps the current setting). Multiply by `count` for views per second."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        recipe = recipe if recipe.image_size == size else view_recipe_like(recipe, size)
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(0)
        make_views(images, recipe, generator, count)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            make_views(images, recipe, generator, count)
            done += batch
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def view_recipe_like(recipe: ViewRecipe, image_size: int) -> ViewRecipe:
    """The same recipe for another image size; the blur kernel is recomputed for the new size."""
    values = {field.name: getattr(recipe, field.name) for field in fields(ViewRecipe)}
    values.update(image_size=image_size, blur_kernel=None)
    return ViewRecipe(**values)
