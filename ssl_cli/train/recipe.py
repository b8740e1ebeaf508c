"""The training recipe every training stage shares, with defaults measured on small images
(bench/recipes.py; the table and the reasoning are in bench/README.md).

- epochs: when not given, enough to see about 60,000 images, at least 10 and at most 100 epochs
  (1,000 labelled images -> 60 epochs; Fashion-MNIST's 60,000 -> 10);
- shift: when not given, 1/14 of the image side (2 px at 28-32 px, the usual small-image shift);
- image size: when not given, the images' own size if the source knows it (Fashion-MNIST: 28) and the
  arch accepts it, else the arch's input size: upsampling 28 px to 32 px costs 30% more compute and
  adds no information;
- classification steps use label smoothing (0.1 by default).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ssl_cli.data.batch_augment import BatchAugment
from ssl_cli.data.sources import ImageSource
from ssl_cli.errors import UserError
from ssl_cli.models.registry import ArchSpec
from ssl_cli.train.loop import StepContext, TrainOptions

IMAGES_PER_RUN = 60_000
MIN_EPOCHS, MAX_EPOCHS = 10, 100


def default_epochs(images: int) -> int:
    """Epochs that show about IMAGES_PER_RUN images, clamped to [MIN_EPOCHS, MAX_EPOCHS]."""
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(IMAGES_PER_RUN / max(1, images)))))


def default_shift(size: int) -> float:
    """Largest random shift in pixels for a `size`-pixel input: 2 px at 28-32 px, 16 px at 224 px."""
    return float(round(size / 14))


def training_size(spec: ArchSpec, source: ImageSource, requested: int | None, flag: str = "--image-size") -> int:
    """The side images are trained at: `requested`, else the source's own size when the arch accepts
    it and it is within the arch's small-image range, else the arch's input size."""
    native = source.native_size
    if requested is not None:
        size = requested
    elif native is not None and spec.min_input_size <= native <= max(spec.input_size, 64):
        size = native
    else:
        size = spec.input_size
    if size < spec.min_input_size:
        raise UserError(f"{flag} {size} is too small for {spec.name} (minimum {spec.min_input_size})")
    return size


def epochs_for(cfg: Any, images: int) -> int:
    return cfg.epochs if cfg.epochs is not None else default_epochs(images)


def train_options(cfg: Any, images: int) -> TrainOptions:
    """The loop's options from any TrainConfig; `images` (per epoch) sets the default epoch count."""
    return TrainOptions(epochs=epochs_for(cfg, images), batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
                        schedule=cfg.schedule, seed=cfg.seed, deterministic=cfg.deterministic, device=cfg.device,
                        workers=cfg.workers, progress=cfg.progress)


def batch_augment(cfg: Any, size: int, mean, std, normalise: str = "mean_std") -> BatchAugment:
    """The batched augmentation of a ClassifierTrainConfig at training size `size`."""
    shift = cfg.shift if cfg.shift is not None else default_shift(size)
    return BatchAugment(mean=tuple(mean), std=tuple(std), min_scale=cfg.min_scale, shift=shift, flip=cfg.flip,
                        grayscale_prob=getattr(cfg, "grayscale_prob", 0.0), color_jitter=getattr(cfg, "color_jitter", 0.0),
                        normalise=normalise)


def classification_step(label_smoothing: float):
    """A step for a network that outputs logits (B, C) against int64 targets (B,)."""

    def step(network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, context: StepContext | None = None):
        logits = network(inputs)
        loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
        return loss, (logits.argmax(1) == targets).float().mean().item()

    return step
