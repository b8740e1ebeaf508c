"""What the clustering methods share: labels made from the whole set between epochs, kept in the head.

DeepCluster and SeLa alternate two steps: label every training image from the current network (k-means
on its features, or an equipartition of its predictions), then train the network to predict those
labels. The labelling runs before an epoch (`epoch_start`, a hook of the training loop), over every
image in eval mode, with no gradient and without touching the training RNG; the labels, the epoch they
were made for and the figures of the labelling are buffers of the head, so they are in every
checkpoint: a run killed mid-epoch resumes that epoch with the same labels and does not label again.

Under torchrun each rank embeds only its contiguous share of the set (`distributed.row_share`: rows
[r ceil(N / W), (r + 1) ceil(N / W)) of the dataset order), so W ranks run the network over the set once; the
methods then combine the shares so that every rank holds the labels one process would make (see
`deepcluster` and `sela`). DDP broadcasts rank 0's buffers at every forward, which is harmless here:
the labels are already the same on every rank, and each rank's sampler is built from them before.

Images are held as uint8 at the training size (in memory when they fit, see `ResizedImages`); the
training view is the small-image recipe of `ssl train` (random flips and shifts of side/14, and an
optional random resized crop), drawn per step on the device (`BatchAugment`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ssl_cli.data.batch_augment import BatchAugment
from ssl_cli.data.sources import ImageSource
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError
from ssl_cli.models.projected import projection_block
from ssl_cli.pretext.base import PretextTask, TaskInfo
from ssl_cli.pretext.contrastive.base import WholeImages, check_number
from ssl_cli.train.distributed import ProcessGroup, row_share
from ssl_cli.train.recipe import default_shift

EMBED_BATCH = 256


class ClusteringTask(PretextTask):
    """Base of DeepCluster and SeLa. Subclasses implement `build_head`, `forward` and `relabel`."""

    family: ClassVar[str] = "clustering"
    min_image_size = 8

    def __init__(self, image_size: int, sobel: bool = False, min_scale: float = 1.0, shift: float | None = None):
        super().__init__(image_size)
        check_number(self.name, "image_size", image_size, self.min_image_size, 4096, integer=True)
        if not isinstance(sobel, bool):
            raise UserError(f"{self.name}: sobel must be true or false, got {sobel!r}")
        check_number(self.name, "min_scale", min_scale, 0.01, 1.0)
        if shift is not None:
            check_number(self.name, "shift", shift, 0, image_size)
        self.sobel, self.min_scale = sobel, float(min_scale)
        self.shift = float(shift) if shift is not None else default_shift(image_size)
        self.input_mode = "sobel" if sobel else "rgb"
        self.images: WholeImages | None = None
        self.size_of_dataset = 0
        self.seed = 0

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, {**self.options(), "sobel": self.sobel, "min_scale": self.min_scale,
                                    "shift": self.shift})

    def options(self) -> dict[str, Any]:
        """The method's own options (plain types), recorded in the checkpoint."""
        return {}

    def dataset(self, source: ImageSource, seed: int) -> WholeImages:
        self.images = WholeImages(source, self.image_size)
        self.size_of_dataset, self.seed = len(self.images), seed
        self.check_size(self.size_of_dataset)
        return self.images

    k = 0  # labels the method makes; set by subclasses
    k_noun: ClassVar[str] = "clusters"  # what k counts, for the error below

    def check_size(self, images: int) -> None:
        """A UserError when the set has fewer images than the k labels."""
        if self.k > images:
            raise UserError(f"{self.name}: k={self.k} {self.k_noun} need at least as many images, the data has "
                            f"{images}; lower --task-option k")

    def batch_transform(self):
        augment = BatchAugment(mean=IMAGENET_MEAN, std=IMAGENET_STD, min_scale=self.min_scale, shift=self.shift,
                               flip=True, normalise=self.input_mode)
        return lambda images, generator: augment(images, generator)

    def normalise(self) -> BatchAugment:
        """uint8 images -> the network's input, no augmentation (the labelling pass)."""
        return BatchAugment(mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=False, normalise=self.input_mode)

    def meta(self) -> dict[str, Any]:
        return {"labels_from": self.name}

    # --- the labelling between epochs ---------------------------------------------------------------

    def shard(self, group: ProcessGroup) -> range:
        """The rows of the training set this rank embeds at a labelling (all of them without torchrun)."""
        return row_share(self.size_of_dataset, group)

    @torch.no_grad()
    def embed(self, network: nn.Module, read: Callable[[torch.Tensor], torch.Tensor],
              rows: range | None = None) -> Iterator[np.ndarray]:
        """Blocks of `read(trunk map)` over the training images `rows` (default: all) in order, in eval mode:
        (b, ...) float32 arrays, at most EMBED_BATCH rows each; the training RNG and the BN statistics are left
        as they were."""
        if self.images is None:
            raise RuntimeError(f"{self.name}: dataset() must run before the labelling pass")
        device = next(network.parameters()).device
        normalise = self.normalise()
        rows = range(len(self.images)) if rows is None else rows
        loader = DataLoader(Subset(self.images, rows), batch_size=EMBED_BATCH, shuffle=False,
                            num_workers=0 if self.images.in_memory else 2)
        was_training = network.training
        network.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for images, _, _, _ in loader:
                    yield read(network.trunk(normalise(images.to(device)))).float().cpu().numpy()
        finally:
            network.train(was_training)

    def epoch_start(self, network: nn.Module, epoch: int, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Label the set for `epoch` (0-based) unless the head already holds labels made for it (a resumed
        epoch); returns this epoch's sampling weights (None: the usual shuffle)."""
        head = network.head
        if int(head.labelled_epoch) != epoch and self.due(epoch):
            began = time.perf_counter()
            self.relabel(network, epoch, optimizer)
            head.labelled_epoch.fill_(epoch)
            head.label_seconds.fill_(time.perf_counter() - began)
        return self.sample_weights(head)

    def due(self, epoch: int) -> bool:
        """Whether the labels are made again before `epoch` (always before the first)."""
        return True

    def relabel(self, network: nn.Module, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def sample_weights(self, head: nn.Module) -> torch.Tensor | None:
        return None

    def epoch_end(self, network: nn.Module, epoch: int) -> dict[str, float]:
        """Figures of the last labelling for the epoch's metrics row."""
        return {}


def mlp_body(channels: int, hidden_dim: int | None) -> tuple[nn.Sequential, int]:
    """DeepCluster's fc6/fc7 on the pooled trunk, (B, channels) -> (B, hidden): Linear, BN, ReLU, twice;
    hidden = hidden_dim, else max(512, channels) (the paper's 4096 suits 224 px AlexNets)."""
    hidden = hidden_dim or max(512, channels)
    return nn.Sequential(projection_block(channels, hidden), projection_block(hidden, hidden)), hidden


def add_label_buffers(head: nn.Module, rows: tuple[int, ...]) -> None:
    """The labels (int64 `rows`, -1 until made) and the bookkeeping every clustering head carries.

    The labels are made identical on every rank by the labelling pass itself, so DDP need not broadcast them
    from rank 0 at every forward (20 MB a step for DeepCluster at 1.28M images, heads x that for SeLa):
    `same_on_every_rank` names them for the loop (`ssl_cli.train.loop.unsynced_buffers`)."""
    head.register_buffer("labels", torch.full(rows, -1, dtype=torch.int64))
    head.same_on_every_rank = ("labels",)
    head.register_buffer("labelled_epoch", torch.tensor(-1, dtype=torch.int64))
    head.register_buffer("label_seconds", torch.tensor(0.0, dtype=torch.float64))


def reset_linear(layer: nn.Linear, seed: int, optimizer: torch.optim.Optimizer | None) -> None:
    """Fresh weights for `layer`, drawn from `seed` alone (as nn.Linear initialises), and no optimizer
    state left for them (Adam's moments of the old classifier would steer the new one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        layer.weight.copy_(fresh.weight)
        if layer.bias is not None:
            layer.bias.copy_(fresh.bias)
    if optimizer is not None:
        for parameter in layer.parameters():
            optimizer.state.pop(parameter, None)
