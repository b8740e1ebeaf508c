"""RandAugment (Cubuk et al. 2020) on a whole uint8 batch on the training device, seeded per step.

Every image draws its own `num_ops` operations and signs; within one round of draws the images are
sorted by the operation they drew and each operation runs once on the images that drew it (the five
geometric ones share one `grid_sample` with a matrix per image). All draws come from the step's
generator (`batch_augment.step_generator`), so a batch is noised the same way in any worker layout
and after a resume, and the data path stays decode + resize in workers.

The operations, their magnitude bins and their arithmetic are torchvision's `RandAugment` on uint8
tensors (`transforms.autoaugment`, `transforms.functional`): nearest-neighbour warps with black
fill, blends computed in float32 and truncated to uint8, warps and blurs rounded. The tests check
every operation against torchvision's on the same image and parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn import functional as F

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
GEOMETRIC = OPS[1:6]  # contiguous in OPS: after sorting by operation their images form one block
SIGNED = frozenset(GEOMETRIC + ("Brightness", "Color", "Contrast", "Sharpness"))


@functools.lru_cache(maxsize=16)
def magnitudes(num_bins: int, height: int, width: int) -> dict[str, list[float]]:
    """Each operation's magnitude per bin (0..num_bins-1), torchvision's RandAugment space; empty for
    operations without one (Identity, AutoContrast, Equalize)."""
    space = {
        "ShearX": torch.linspace(0.0, 0.3, num_bins), "ShearY": torch.linspace(0.0, 0.3, num_bins),
        "TranslateX": torch.linspace(0.0, 150.0 / 331.0 * width, num_bins),
        "TranslateY": torch.linspace(0.0, 150.0 / 331.0 * height, num_bins),
        "Rotate": torch.linspace(0.0, 30.0, num_bins),
        "Brightness": torch.linspace(0.0, 0.9, num_bins), "Color": torch.linspace(0.0, 0.9, num_bins),
        "Contrast": torch.linspace(0.0, 0.9, num_bins), "Sharpness": torch.linspace(0.0, 0.9, num_bins),
        "Posterize": 8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int(),
        "Solarize": torch.linspace(255.0, 0.0, num_bins),
    }
    return {op: [float(v) for v in space[op].tolist()] if op in space else [] for op in OPS}


@dataclass(frozen=True)
class BatchRandAugment:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, H, W): `num_ops` RandAugment operations per image at bin
    `magnitude` of `num_magnitude_bins` (torchvision's defaults: 31 bins, 9 = Noisy Student's ImageNet
    setting), each signed operation negated with probability 1/2 per image. num_ops 0: unchanged."""

    num_ops: int
    magnitude: int
    num_magnitude_bins: int = 31

    def __post_init__(self):
        if self.num_ops < 0 or not 0 <= self.magnitude < self.num_magnitude_bins:
            raise ValueError(f"RandAugment needs num_ops >= 0 and 0 <= magnitude < {self.num_magnitude_bins}, "
                             f"got {self.num_ops} and {self.magnitude}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment takes uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if not self.num_ops or not len(images):
            return images
        batch = images.shape[0]
        ops = torch.randint(len(OPS), (self.num_ops, batch), generator=generator, device=images.device)
        negative = torch.randint(2, (self.num_ops, batch), generator=generator, device=images.device).bool()
        for drawn, flipped in zip(ops, negative):
            images = self.round(images, drawn, flipped)
        return images

    def round(self, images: torch.Tensor, ops: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """One operation per image: ops (B,) int64 indices into OPS, negative (B,) bool signs."""
        order = torch.argsort(ops, stable=True)
        counts = torch.bincount(ops, minlength=len(OPS)).tolist()  # the one host sync of a round
        table = magnitudes(self.num_magnitude_bins, images.shape[2], images.shape[3])
        value = {op: table[op][self.magnitude] if table[op] else 0.0 for op in OPS}
        # sorted by operation, each operation's images are one slice (a view, no gather per operation)
        images, ops, negative = images[order], ops[order], negative[order]
        geometric = sum(counts[1:6])
        pieces = [images[:counts[0]]]  # Identity
        start = counts[0]
        if geometric:
            block = slice(start, start + geometric)
            pieces.append(warp(images[block], ops[block], negative[block], value))
        start += geometric
        for index in range(6, len(OPS)):
            if counts[index]:
                block = slice(start, start + counts[index])
                sign = torch.where(negative[block], -1.0, 1.0) if OPS[index] in SIGNED else None
                pieces.append(apply_colour_op(OPS[index], images[block], value[OPS[index]], sign))
            start += counts[index]
        return torch.cat(pieces)[torch.argsort(order)]


def warp(images: torch.Tensor, ops: torch.Tensor, negative: torch.Tensor, value: dict[str, float]) -> torch.Tensor:
    """uint8 (n, C, H, W) -> the same, each image sheared, translated or rotated as its op (n,) says,
    by its signed magnitude: torchvision's `affine`/`rotate` (inverse matrix about the image centre, or
    the top-left corner for shears; nearest neighbour; black outside), one grid for each image."""
    n, _, height, width = images.shape
    dtype = torch.float32 if images.device.type == "mps" else torch.float64  # the matrix in double, as torchvision
    sign = torch.where(negative, -1.0, 1.0).to(dtype)

    def where(op: str, values: torch.Tensor) -> torch.Tensor:
        return torch.where(ops == OPS.index(op), values, torch.zeros_like(values))

    def signed(op: str) -> torch.Tensor:
        return where(op, sign * value[op])

    shear_x = torch.deg2rad(torch.rad2deg(torch.atan(signed("ShearX"))))
    shear_y = torch.deg2rad(torch.rad2deg(torch.atan(signed("ShearY"))))
    rotation = torch.deg2rad(-signed("Rotate"))  # `rotate` passes -angle to the affine matrix
    translate_x, translate_y = signed("TranslateX").trunc(), signed("TranslateY").trunc()  # int(magnitude)
    shear = (ops == OPS.index("ShearX")) | (ops == OPS.index("ShearY"))  # centre=[0, 0]: the top-left corner
    centre_x = torch.where(shear, -width * 0.5, 0.0).to(dtype)
    centre_y = torch.where(shear, -height * 0.5, 0.0).to(dtype)
    # torchvision's _get_inverse_affine_matrix at scale 1, term by term
    a = torch.cos(rotation - shear_y) / torch.cos(shear_y)
    b = -torch.cos(rotation - shear_y) * torch.tan(shear_x) / torch.cos(shear_y) - torch.sin(rotation)
    c = torch.sin(rotation - shear_y) / torch.cos(shear_y)
    d = -torch.sin(rotation - shear_y) * torch.tan(shear_x) / torch.cos(shear_y) + torch.cos(rotation)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-centre_x - translate_x) + m1 * (-centre_y - translate_y) + centre_x
    m5 = m3 * (-centre_x - translate_x) + m4 * (-centre_y - translate_y) + centre_y
    theta = torch.stack([m0, m1, m2, m3, m4, m5], 1).view(n, 2, 3).float()
    # torchvision's _gen_affine_grid: pixel-centre coordinates, normalised after the matrix
    base = torch.empty(1, height, width, 3, device=images.device)
    base[..., 0].copy_(torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, steps=width, device=images.device))
    base[..., 1].copy_(torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, steps=height,
                                      device=images.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * width, 0.5 * height], device=images.device)
    # one (H W, 3) x (3, 2 n) product for every image's grid (n small products cost more on a CPU)
    columns = (theta.transpose(1, 2) / scale).permute(1, 0, 2).reshape(3, 2 * n)
    grid = base.view(height * width, 3).mm(columns).view(height, width, n, 2).permute(2, 0, 1, 3)
    warped = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped.round().to(torch.uint8)


def apply_colour_op(op: str, images: torch.Tensor, magnitude: float, sign: torch.Tensor | None) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> the same with one pixel operation; sign (n,) of the signed ones' magnitude."""
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        signed = (sign * magnitude).view(-1, 1, 1, 1)
        other = {"Brightness": lambda: torch.zeros_like(images), "Color": lambda: grey(images).expand_as(images),
                 "Contrast": lambda: grey(images).float().mean(dim=(-3, -2, -1), keepdim=True),
                 "Sharpness": lambda: blurred(images)}[op]()
        if op == "Sharpness" and (images.shape[-1] <= 2 or images.shape[-2] <= 2):
            return images
        return blend(images, other, signed)
    if op == "Posterize":
        return images & (256 - 2 ** (8 - int(magnitude)))  # keep the top `magnitude` bits
    if op == "Solarize":
        return torch.where(images >= magnitude, 255 - images, images)
    if op == "AutoContrast":
        return autocontrast(images)
    if op == "Equalize":
        return equalize(images)
    raise ValueError(f"unknown RandAugment operation {op!r}; known: {', '.join(OPS)}")


def blend(images: torch.Tensor, other: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """(1 + m) x images - m x other, per image m (n, 1, 1, 1), clamped and truncated to uint8: torchvision's
    _blend at factor 1 + m (whose 1 - factor it computes in double, exactly -m)."""
    return ((1 + signed) * images + (-signed) * other).clamp(0, 255).to(torch.uint8)


def grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> uint8 (n, 1, H, W) luma, truncated (torchvision's rgb_to_grayscale)."""
    r, g, b = images.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).unsqueeze(-3)


def blurred(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W) -> the image smoothed by PIL's SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1, / 13) inside a
    1-pixel border, which is kept, rounded. The sum S of the 3x3 box plus 4 x the centre is an integer and
    S / 13 is never within 1/26 of a half-integer, so any float error far below that (torchvision's
    convolution, this box filter) rounds to the same value: the box filter costs less than a grouped conv."""
    x = images.float()
    box = F.avg_pool2d(x, 3, stride=1) * 9
    inner = ((box + 4 * x[..., 1:-1, 1:-1]) / 13).round().to(torch.uint8)
    result = images.clone()
    result[..., 1:-1, 1:-1] = inner
    return result


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W) -> each channel stretched to 0..255 (a constant channel unchanged)."""
    low = images.amin(dim=(-2, -1), keepdim=True).float()
    high = images.amax(dim=(-2, -1), keepdim=True).float()
    scale = 255.0 / (high - low)
    constant = ~torch.isfinite(scale)
    low, scale = low.masked_fill(constant, 0.0), scale.masked_fill(constant, 1.0)
    return ((images - low) * scale).clamp(0, 255).to(torch.uint8)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W) -> each channel's histogram equalised (torchvision's / PIL's ImageOps.equalize)."""
    n, channels, height, width = images.shape
    rows = images.reshape(n * channels, height * width)
    offsets = torch.arange(len(rows), device=images.device).unsqueeze(1) * 256
    # one histogram per channel of every image; bincount without weights is deterministic on every device
    histogram = torch.bincount((rows.long() + offsets).flatten(), minlength=len(rows) * 256).view(len(rows), 256)
    brightest = histogram.gather(1, rows.amax(1, keepdim=True).long())
    step = (height * width - brightest) // 255  # all but the last non-empty bin, / 255
    lut = (histogram.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    equalised = lut.gather(1, rows.long()).to(torch.uint8)
    return torch.where(step == 0, rows, equalised).view(n, channels, height, width)
