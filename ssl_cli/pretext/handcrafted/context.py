"""Context prediction (Doersch, Gupta & Efros 2015): where does a patch sit relative to the centre one?

Geometry of an S x S crop (p = patch_size, g = gap, j = jitter):

    a 3 x 3 grid of cells, each p + 2j wide, separated by g pixels, centred in the crop
    (so 3(p + 2j) + 2g <= S). A patch lies inside its cell, shifted from the cell's middle by
    a uniform integer in [-j, j] on each axis. Neighbouring patches are therefore always at least
    g pixels apart (at most g + 4j): the gap stops the trunk from matching edges or textures
    across the border, and the jitter stops it from extrapolating straight lines exactly.

Defaults scale with the crop: g = j = max(1, S // 32), p = (S - 2g - 6j) // 3, so a 32 px crop
gives 8 px patches with a 1 px gap and +-1 px jitter, a 64 px crop 16 px patches, 225 px 56 px
patches. (Doersch used 96 px patches, a 48 px gap and up to 7 px jitter on larger images; a
half-patch gap would leave no pixels for the patches at the 32-64 px sizes this CLI trains at.)
Patches are at least `MIN_PATCH_SIZE` px, so the smallest crop the defaults accept is 32.

Labels, row-major over the grid skipping the centre:

    0 1 2
    3 . 4
    5 6 7

A sample is the centre patch and one neighbour drawn uniformly, stacked as (2, 3, p, p) in
that order. Each patch is normalised on its own (`per_image_normalise`) so brightness and
contrast shared across the pair cannot give the answer away.

Colour dropping (`color_drop`, default on): Doersch found the network solves the task from
chromatic aberration (colour fringes that grow towards the lens edge tell where a patch was);
following the paper, each patch keeps one random colour channel and the other two are replaced
with Gaussian noise of 1/100 of the kept channel's standard deviation (zero-mean in the
ImageNet-normalised space, i.e. the dataset mean colour).

On the batch (what training runs; `build_sample` is the per-image definition it is tested against):
the loader delivers the uint8 S x S squares (short side resized to S, centre square kept) and
`batch_transform()` draws every sample's label, jitters, kept channels and noise from the step's
generator and cuts the 2B patches with one gather. (`random_crop`, a random square along the long
side of a non-square image, applies to `build_sample` only: the batched path sees the centre square.)

Head (Doersch's late fusion): a shared fc6 per patch (flatten the trunk map -> Linear -> ReLU),
the two fc6 vectors concatenated (centre first), fc7 (Linear -> ReLU), fc8 -> 8 logits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssl_cli.errors import UserError
from ssl_cli.pretext.base import ClassificationTask, TaskBatch, TaskInfo, per_image_normalise
from ssl_cli.pretext.crops import square_crop, to_normalised_tensor
from ssl_cli.pretext.on_batch import cut_squares, imagenet_normalise, integers, square_images

# (row, column) of each label's cell in the 3 x 3 grid; the centre is (1, 1).
NEIGHBOURS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))
CENTRE = (1, 1)
MIN_PATCH_SIZE = 8  # the lowres ResNets still have a 1 x 1 map at 8 px
HIDDEN = 256  # fc6/fc7 width: Doersch used 4096 on 96 px patches; 256 keeps CPU runs small
NOISE_SCALE = 0.01  # dropped channels: noise at 1/100 of the kept channel's std (Doersch et al.)

Position = tuple[int, int]  # (top, left) of a patch in the S x S crop


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"context: {name} must be an integer >= {minimum}, got {value!r}")
    return value


class ContextHead(nn.Module):
    """(2B, C, h, w) trunk maps, centre and neighbour interleaved -> (B, 8) logits."""

    def __init__(self, trunk_features: int, hidden: int = HIDDEN):
        super().__init__()
        self.hidden = hidden
        self.fc6 = nn.Sequential(nn.Linear(trunk_features, hidden), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(inplace=True))
        self.fc8 = nn.Linear(hidden, len(NEIGHBOURS))

    def forward(self, trunk_maps: torch.Tensor) -> torch.Tensor:
        per_patch = self.fc6(trunk_maps.flatten(1))  # (2B, hidden)
        pairs = per_patch.reshape(-1, 2 * self.hidden)  # (B, 2 * hidden): [centre, neighbour]
        return self.fc8(self.fc7(pairs))


class ContextTask(ClassificationTask):
    """inputs (2, 3, p, p) = (centre patch, neighbour patch); target () int64 = neighbour label 0..7."""

    name = "context"
    per_image_normalise = True
    min_image_size = 3 * (MIN_PATCH_SIZE + 2) + 2  # with the default gap = jitter = 1 at S = 32

    def __init__(self, image_size: int, patch_size: int | None = None, gap: int | None = None,
                 jitter: int | None = None, color_drop: bool = True, random_crop: bool = True):
        super().__init__(image_size)
        if not isinstance(image_size, int) or isinstance(image_size, bool):
            raise UserError(f"context: image_size must be an integer, got {image_size!r}")
        self.gap = max(1, image_size // 32) if gap is None else _check_int("gap", gap, 0)
        self.jitter = max(1, image_size // 32) if jitter is None else _check_int("jitter", jitter, 0)
        if patch_size is None:
            patch_size = (image_size - 2 * self.gap - 6 * self.jitter) // 3
            if patch_size < MIN_PATCH_SIZE:
                raise UserError(self._too_small(MIN_PATCH_SIZE))
        self.patch_size = _check_int("patch_size", patch_size, MIN_PATCH_SIZE)
        if self.span() > image_size:
            raise UserError(self._too_small(self.patch_size))
        if not isinstance(color_drop, bool) or not isinstance(random_crop, bool):
            raise UserError(f"context: color_drop and random_crop must be true or false, "
                            f"got {color_drop!r} and {random_crop!r}")
        self.color_drop, self.random_crop = color_drop, random_crop

    def _too_small(self, patch_size: int) -> str:
        needed = 3 * (patch_size + 2 * self.jitter) + 2 * self.gap
        return (f"context: image_size {self.image_size} cannot hold 3 patches of {patch_size} px with gap "
                f"{self.gap} and jitter {self.jitter}: the minimum image size is {needed} "
                f"(3 x (patch_size + 2 x jitter) + 2 x gap; patch_size >= {MIN_PATCH_SIZE})")

    def span(self) -> int:
        """Side of the 3 x 3 grid of cells: 3 (p + 2j) + 2g."""
        return 3 * (self.patch_size + 2 * self.jitter) + 2 * self.gap

    def classes(self) -> int:
        return len(NEIGHBOURS)

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, {"patch_size": self.patch_size, "gap": self.gap, "jitter": self.jitter,
                                    "color_drop": self.color_drop, "random_crop": self.random_crop})

    def tile_size(self) -> int:
        return self.patch_size

    def patch_positions(self, label: int, rng: np.random.Generator) -> tuple[Position, Position]:
        """(top, left) of the centre patch and of neighbour `label`, each jittered independently."""
        pitch = self.patch_size + 2 * self.jitter + self.gap
        offset = (self.image_size - self.span()) // 2
        shifts = rng.integers(-self.jitter, self.jitter + 1, size=4)
        positions = []
        for (row, column), (dy, dx) in zip((CENTRE, NEIGHBOURS[label]), shifts.reshape(2, 2)):
            positions.append((offset + row * pitch + self.jitter + int(dy),
                              offset + column * pitch + self.jitter + int(dx)))
        return positions[0], positions[1]

    def build_sample_with_positions(self, image: Image.Image, rng: np.random.Generator
                                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[Position, Position]]:
        """`build_sample` plus where the two patches were cut, for tests and visualisation."""
        pixels = to_normalised_tensor(square_crop(image, self.image_size, rng, self.random_crop))
        label = int(rng.integers(len(NEIGHBOURS)))
        positions = self.patch_positions(label, rng)
        p = self.patch_size
        patches = torch.stack([pixels[:, top:top + p, left:left + p] for top, left in positions])
        if self.color_drop:
            patches = torch.stack([self._drop_colours(patch, rng) for patch in patches])
        return per_image_normalise(patches), torch.tensor(label, dtype=torch.int64), positions

    def _drop_colours(self, patch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(3, p, p) -> same with one random channel kept and the other two replaced by faint noise."""
        kept = int(rng.integers(3))
        scale = NOISE_SCALE * float(patch[kept].std())
        noise = torch.from_numpy(rng.standard_normal(patch.shape, dtype=np.float32)) * scale
        noise[kept] = patch[kept]
        return noise

    def build_sample(self, image: Image.Image, rng: np.random.Generator,
                     other: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, target, _ = self.build_sample_with_positions(image, rng)
        return inputs, target

    # --- on the batch (what training runs) ----------------------------------------------------------

    def dataset(self, source, seed: int):
        return square_images(source, self.image_size)

    def batch_transform(self):
        def pairs(images: torch.Tensor, generator: torch.Generator) -> TaskBatch:
            return self.batch_sample(images, *self.draw(len(images), generator))

        return pairs

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(labels (B,), shifts (B, 2, 2) (dy, dx) of centre and neighbour in [-j, j], kept channels (B, 2),
        noise (B, 2, 3, p, p) standard normal) for `batch` samples, from `generator`."""
        p = self.patch_size
        labels = integers(len(NEIGHBOURS), (batch,), generator)
        shifts = integers(2 * self.jitter + 1, (batch, 2, 2), generator) - self.jitter
        kept = integers(3, (batch, 2), generator)
        noise = torch.randn(batch, 2, 3, p, p, generator=generator, device=generator.device) if self.color_drop \
            else torch.zeros(0, device=generator.device)
        return labels, shifts, kept, noise

    def batch_sample(self, images: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor, kept: torch.Tensor,
                     noise: torch.Tensor) -> TaskBatch:
        """uint8 (B, 3, S, S) -> TaskBatch((B, 2, 3, p, p) centre and neighbour patches, (B,) labels)."""
        device, p = images.device, self.patch_size
        pitch = self.patch_size + 2 * self.jitter + self.gap
        cells = torch.tensor([CENTRE, *NEIGHBOURS], device=device)  # (9, 2): the centre, then label order
        chosen = torch.stack([cells[torch.zeros_like(labels)], cells[labels + 1]], dim=1)  # (B, 2, 2)
        at = (self.image_size - self.span()) // 2 + chosen * pitch + self.jitter + shifts
        sources = torch.arange(len(images), device=device)[:, None].expand(-1, 2)
        patches = imagenet_normalise(cut_squares(images, sources, at[..., 0], at[..., 1], p))
        if self.color_drop:
            index = kept.view(-1, 2, 1, 1, 1).expand(-1, -1, 1, p, p)
            channel = torch.gather(patches, 2, index)  # (B, 2, 1, p, p)
            scale = NOISE_SCALE * channel.flatten(2).std(dim=2).view(-1, 2, 1, 1, 1)
            patches = (noise * scale).scatter(2, index, channel)
        return TaskBatch(per_image_normalise(patches), labels)

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels, height, width = trunk_shape
        return ContextHead(channels * height * width)

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3, p, p) -> (B, 8) logits; the trunk runs once on all 2B patches."""
        return head(trunk(inputs.flatten(0, 1)))

