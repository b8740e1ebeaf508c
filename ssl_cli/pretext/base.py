"""What every pretext task provides, and the network that wraps a backbone with a task head.

A task splits into the parts that run in different places:
- `build_sample(image, rng, other)` runs in DataLoader workers: PIL image in, (inputs, target) tensors out;
  all randomness comes from `rng`, seeded per (seed, epoch, index) by the loop, so samples are
  reproducible in any worker and after a resume; jigsaw, jigsaw++, context, colorization, inpainting and
  rotation train from the same sample cut on the batch instead (`dataset()` + `batch_transform()`, see
  `pretext.on_batch`) and keep `build_sample` as its per-image definition;
- `build_head(trunk_shape)` makes the task's trainable head;
- `forward(trunk, head, inputs)` runs on the device with batched tensors;
- `loss(output, target)` and `accuracy(output, target)` score a batch.

Methods that need more (several views, a momentum encoder, a queue or a memory bank) override the
hooks below, whose defaults give the handcrafted tasks' behaviour; whatever they keep between steps
lives in the head (parameters and buffers), so the checkpoint holds it and resume stays exact:
- `dataset(source, seed)`: what the loop iterates (default: `build_sample` per image in workers);
- `batch_transform()`: a batched augmentation on the device, e.g. two views per image (default none); the
  handcrafted tasks cut their samples there (`pretext.on_batch`) and return a `TaskBatch` that carries the
  targets drawn with them;
- `attach(network)`: called once the network exists (a momentum copy of the backbone, say);
- `objective(head, output, target, context)`: loss and accuracy; gets the batch's dataset indices;
- `after_step(head, context)`: after each optimizer step (a momentum update);
- `epoch_start(network, epoch, optimizer)`: before every epoch, a resumed one too (DeepCluster labels the
  whole set); may return the epoch's sampling weights;
- `epoch_end(network, epoch)`: figures for the epoch's metrics row;
- `caveats(source)`: warnings the stage prints before training when the data cannot serve the task
  (colorization on grey images).

The backbone is a registry arch (torchvision layout), so after pretext training its state dict
loads into the same arch for `ssl extract`; only `trunk` (the backbone up to its conv map) is
trained by a pretext task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssl_cli.errors import UserError
from ssl_cli.models.projected import trunk_map
from ssl_cli.pretext.dataset import PretextDataset

if TYPE_CHECKING:
    from ssl_cli.data.sources import ImageSource
    from ssl_cli.train.loop import BatchTransform, StepContext, TrainDataset


@dataclass(frozen=True)
class TaskInfo:
    """What a checkpoint records about the task, beside the arch."""

    name: str
    options: dict[str, Any]  # plain types only (lists, ints, floats, str): stored in the checkpoint


class TaskBatch(NamedTuple):
    """A batch whose samples were built on the device: the network's inputs (or, out of the network, its
    output) and the targets drawn with them; the loader's targets are placeholders then."""

    inputs: Any
    targets: torch.Tensor


class PretextTask:
    """Base class. Subclasses set `name`, `min_image_size` and implement the methods below."""

    name: str = ""
    family: ClassVar[str] = "handcrafted"  # handcrafted | contrastive | reconstructive | clustering
    min_image_size: int = 0  # a smaller --image-size cannot hold what the task cuts out
    needs_other_image: bool = False  # jigsaw++ replaces tiles with tiles of a second image
    per_image_normalise: ClassVar[bool] = False  # the trunk sees tiles normalised one by one (jigsaw, context)
    input_mode: ClassVar[str] = "rgb"  # "lightness": the trunk sees the L channel (colorization)

    def __init__(self, image_size: int, **options: Any):
        self.image_size = image_size

    def info(self) -> TaskInfo:
        raise NotImplementedError

    def tile_size(self) -> int:
        """Side of the square the trunk sees (the whole image, a tile or a patch)."""
        return self.image_size

    def build_sample(self, image: Image.Image, rng: np.random.Generator,
                     other: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One training sample. `other` is a second random image when `needs_other_image`."""
        raise NotImplementedError

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        """trunk_shape = (C, h, w) of the trunk's map for a `tile_size()` input."""
        raise NotImplementedError

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accuracy(self, output: torch.Tensor, target: torch.Tensor) -> float | None:
        """Fraction correct in [0, 1], or None for regression tasks."""
        return None

    # --- hooks for methods beyond one sample -> one target (defaults: the handcrafted tasks) ---

    def dataset(self, source: "ImageSource", seed: int) -> "TrainDataset":
        return PretextDataset(source, self, seed)

    def batch_transform(self) -> "BatchTransform | None":
        return None

    def attach(self, network: "PretextNetwork") -> None:
        """Called once, when the network (backbone + head) is built and before it moves to the device."""

    def objective(self, head: nn.Module, output: Any, target: torch.Tensor,
                  context: "StepContext") -> tuple[torch.Tensor, float | None]:
        """(loss, accuracy) of a batch; `head` is the task's head (queues and banks live there)."""
        if isinstance(output, TaskBatch):  # targets drawn on the batch (see `batch_transform`)
            output, target = output
        return self.loss(output, target), self.accuracy(output.detach(), target)

    def after_step(self, network: "PretextNetwork", context: "StepContext") -> None:
        """Runs after every optimizer step."""

    def epoch_start(self, network: "PretextNetwork", epoch: int, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Runs before every epoch (0-based), a resumed one included; returns (N,) sampling weights or None."""
        return None

    def epoch_end(self, network: "PretextNetwork", epoch: int) -> dict[str, float]:
        """Figures of the method for the metrics row of `epoch` (counting from 1)."""
        return {}

    def meta(self) -> dict[str, Any]:
        """What the checkpoint records beside the task options (e.g. the default feature layer)."""
        return {}

    def chance_loss(self) -> float | None:
        """The loss of a network that has learnt nothing (ln C for C classes), or None where there is no
        such level (contrastive, reconstruction); the loop stops a run whose loss climbs far above it."""
        return None

    def caveats(self, source: "ImageSource") -> list[str]:
        """Warnings about these images for this task, printed by the stage before training (none by default)."""
        return []


class ClassificationTask(PretextTask):
    """A task whose output is (B, classes) logits: cross-entropy loss, top-1 accuracy."""

    def classes(self) -> int:
        """C, the number of logits: the chance loss is ln C."""
        raise NotImplementedError

    def chance_loss(self) -> float | None:
        return math.log(self.classes())

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(output, target)

    def accuracy(self, output: torch.Tensor, target: torch.Tensor) -> float | None:
        return (output.argmax(dim=1) == target).float().mean().item()


def trunk_forward(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, h, w): the backbone's last conv map (pool5 for AlexNet/VGG, layer4 for ResNets)."""
    return trunk_map(backbone, images)


class PretextNetwork(nn.Module):
    """backbone (a registry arch) + task head; `forward(inputs)` returns the task's output."""

    def __init__(self, backbone: nn.Module, task: PretextTask):
        super().__init__()
        self.backbone = backbone
        self.task = task
        with torch.no_grad():
            was_training = backbone.training
            backbone.eval()
            try:
                shape = trunk_forward(backbone, torch.zeros(2, 3, task.tile_size(), task.tile_size())).shape[1:]
            except RuntimeError as error:
                if "too small" not in str(error):
                    raise
                raise UserError(
                    f"{task.name}: the network sees {task.tile_size()} px inputs at --image-size {task.image_size}, "
                    f"too small for {type(backbone).__name__}'s poolings; raise --image-size or --tile-size (the trunk needs "
                    f"inputs of at least {minimum_trunk_input(backbone)} px) or use a shallower arch") from None
            backbone.train(was_training)
        self.trunk_shape = tuple(int(s) for s in shape)
        self.head = task.build_head(self.trunk_shape)
        task.attach(self)
        # The backbone's own classifier is not part of the trunk: a pretext task never trains it, and
        # DDP refuses parameters that receive no gradient. The checkpoint leaves it out (`untrained`).
        self.untrained = tuple(name for name in ("classifier", "fc") if hasattr(backbone, name))
        for name in self.untrained:
            getattr(backbone, name).requires_grad_(False)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        return trunk_forward(self.backbone, images)

    def forward(self, inputs: Any) -> Any:
        if isinstance(inputs, TaskBatch):
            return TaskBatch(self.task.forward(self.trunk, self.head, inputs.inputs), inputs.targets)
        return self.task.forward(self.trunk, self.head, inputs)


def minimum_trunk_input(backbone: nn.Module, limit: int = 512) -> int:
    """The smallest square input the backbone's trunk maps to a non-empty conv map."""
    with torch.no_grad():
        for size in range(8, limit):
            try:
                trunk_forward(backbone.eval(), torch.zeros(1, 3, size, size))
                return size
            except RuntimeError:
                continue
    return limit


def per_image_normalise(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(..., C, H, W) -> same, each image/tile to zero mean and unit std over its own pixels.

    Noroozi & Favaro normalise every tile on its own so low-level statistics (brightness,
    contrast shared by neighbouring tiles) cannot solve the puzzle.
    """
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True)
    return (tiles - mean) / (std + eps)
