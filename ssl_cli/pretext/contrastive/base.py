"""What the contrastive methods share: whole images held as uint8, views made in batches on the device.

The per-image data path is deterministic (load, resize to `image_size`, uint8; in memory when the set
fits, see `ResizedImages`); every random choice of the views is drawn in `ssl_cli.data.views` from a
generator seeded by (seed, epoch, step), so a resumed run replays the same views. A method names its
view recipe (a preset of `ssl_cli.data.views` plus overrides given as task options), its head and
its loss.

`views=auto` picks the `grey` recipe when the images are grey (every channel equal in a sample of
them: Fashion-MNIST), where hue, saturation and greyscale do nothing; otherwise the method's own
preset, with `cifar` (SimCLR's recipe for 32 px: jitter 0.5, no blur) at 64 px and below.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ssl_cli.data.resized import GREY_SAMPLE, ResizedImages, is_grey, stored_side
from ssl_cli.data.sources import ImageSource
from ssl_cli.data.views import ViewRecipe, make_views, view_recipe
from ssl_cli.errors import UserError
from ssl_cli.pretext.base import PretextTask, TaskInfo

SMALL_IMAGE = 64  # at or below: the small-image (CIFAR) version of a preset
VIEW_FIELDS = frozenset(field.name for field in fields(ViewRecipe)) - {"image_size", "mean", "std"} | {"jitter_strength"}


def check_number(task: str, name: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    """A UserError naming the task option unless low <= value <= high (and an int when `integer`)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise UserError(f"{task}: {name} must be {what} in [{low}, {high}], got {value!r}")


class WholeImages(ResizedImages):
    """Every image of a source as uint8 (3, T, T), T = `stored_size` (default `size`); the target is unused (0)."""

    def __init__(self, source: ImageSource, size: int, stored_size: int | None = None):
        super().__init__(source, np.arange(len(source)), np.zeros(len(source), dtype=np.int64), size,
                         stored_size=stored_size)

    def sample(self, count: int) -> torch.Tensor:
        """The first `count` images, (count, 3, S, S) uint8 (to look at, e.g. whether they are grey)."""
        count = min(count, len(self))
        if self.cache is not None:
            return self.cache[:count]
        return torch.stack([self[i][0] for i in range(count)])


class ContrastiveTask(PretextTask):
    """Base of the methods that compare views of images. Subclasses set `name`, `preset` and the head/loss."""

    family: ClassVar[str] = "contrastive"
    preset: ClassVar[str] = "simclr"  # the view recipe of the paper, at ImageNet sizes
    min_image_size = 8

    def __init__(self, image_size: int, views: str = "auto", **view_options: Any):
        super().__init__(image_size)
        check_number(self.name, "image_size", image_size, self.min_image_size, 4096, integer=True)
        unknown = sorted(set(view_options) - VIEW_FIELDS)
        if unknown:
            raise TypeError(f"unexpected option(s) {', '.join(unknown)}; view options: {', '.join(sorted(VIEW_FIELDS))}")
        self.views = views
        self.view_options = dict(view_options)
        self.recipe: ViewRecipe | None = None
        if views != "auto":
            self.recipe = view_recipe(views, image_size, **view_options)  # checks the options now

    def view_info(self) -> dict[str, Any]:
        return {"views": self.views, **self.view_options}

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, {**self.options(), **self.view_info()})

    def options(self) -> dict[str, Any]:
        """The method's own options (plain types), recorded in the checkpoint."""
        return {}

    def resolve_views(self, images: torch.Tensor) -> ViewRecipe:
        """The recipe for these images: `views` as given, or the auto choice (see the module docstring)."""
        if self.views != "auto":
            preset = self.views
        elif is_grey(images):
            preset = "grey"
        else:
            preset = "cifar" if self.image_size <= SMALL_IMAGE else self.preset
        return view_recipe(preset, self.image_size, **self.view_options)

    def dataset(self, source: ImageSource, seed: int) -> WholeImages:
        # every preset crops (min_scale < 1): the crops come from the stored image, up to twice image_size
        min_scale = self.recipe.min_scale if self.recipe else self.view_options.get("min_scale", 0.0)
        data = WholeImages(source, self.image_size, stored_side(source, self.image_size, crops=min_scale < 1))
        self.recipe = self.resolve_views(data.sample(GREY_SAMPLE))
        self.size_of_dataset = len(data)
        return data

    def meta(self) -> dict[str, Any]:
        recipe = self.recipe
        return {"view_recipe": {f.name: getattr(recipe, f.name) for f in fields(recipe)}} if recipe else {}

    def batch_transform(self):
        recipe = self.recipe
        if recipe is None:
            raise RuntimeError(f"{self.name}: dataset() decides the view recipe; call it before batch_transform()")

        def two_views(images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
            return make_views(images, recipe, generator, count=2)

        return two_views

    def projection_width(self, channels: int, hidden: int | None) -> int:
        """Hidden width of a projection MLP: the option, else the trunk's channel count (SimCLR's d -> d)."""
        return hidden if hidden is not None else channels


def views_forward(trunk, projection: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every view through trunk, global pool and projection in one batch (batch norm sees all views,
    as SimCLR's global BN does): list of (B, 3, S, S) -> list of (B, D)."""
    from ssl_cli.pretext.heads import global_pool

    batch = views[0].shape[0]
    return list(projection(global_pool(trunk(torch.cat(views)))).split(batch))
