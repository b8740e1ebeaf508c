"""The training recipe every training stage shares, with defaults measured on small images
(bench/recipes.py; the table and the reasoning are in bench/README.md).

- epochs: when not given, enough to see about 60,000 images, at least 10 and at most 100 epochs
  (1,000 labelled images -> 60 epochs; Fashion-MNIST's 60,000 -> 10);
- shift: when not given, 1/14 of the image side (2 px at 28-32 px, the usual small-image shift);
- image size: when not given, the images' own size if the source knows it (Fashion-MNIST: 28) and the
  arch accepts it, else the arch's input size: upsampling 28 px to 32 px costs 30% more compute and
  adds no information;
- classification steps use label smoothing (0.1 by default);
- optimizer: the config's small-image AdamW default, except for the full-size archs without batch norm
  (`vgg16`, `alexnet`): under AdamW every weight moves by about the learning rate whatever its layer's
  fan-in, and their 4096-wide layers (jigsaw's fc7 over 9 x 1024 tile features) turn that into logits
  that blow up: `ssl pretext --task jigsawpp --arch vgg16 --image-size 114` reached a loss of 250 by its
  third step against a chance level of 6.55. They get their papers' recipe instead (`with_arch_recipe`):
  SGD, lr 0.01, momentum 0.9, weight decay 5e-4, cosine: the same run stays finite at 6.55 over its first
  12 steps (too few to learn 701 classes), and a fresh head on VGG16's conv stack learns under it
  (tests/train/test_plain_recipe.py). The *_lowres variants keep AdamW, which was measured on them
  (bench/recipes.py): on 128 toy images `ssl train --arch vgg16_lowres --width 0.25` reached loss 0.68 in
  48 steps under it (width 1: 1.12, no divergence) while SGD at 0.01 stayed at 1.37-1.38 (chance 1.39).
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


# Full-size archs without batch norm, and the recipe their papers train them with (Simonyan & Zisserman
# 2015: SGD 0.01, momentum 0.9, weight decay 5e-4; Noroozi & Favaro 2016 likewise for Jigsaw).
PLAIN_ARCHS = frozenset({"vgg16", "alexnet"})
PLAIN_RECIPE = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
RECIPE_FIELDS = ("optimizer", "lr")  # a user who sets either chose the recipe: nothing is filled in then


def with_arch_recipe(cfg: Any, arch: str | None = None) -> Any:
    """`cfg` with its arch's recipe as defaults: for a PLAIN_ARCHS arch (`arch`, else `cfg.arch`) whose
    --lr and --optimizer were both left unset, the PLAIN_RECIPE fields the user did not set; any other
    config is returned as it is. A value the user gave (flag or YAML) is never replaced. Call it before
    the provenance is made, so the checkpoint records (and the fingerprint covers) what actually ran."""
    arch = arch if arch is not None else getattr(cfg, "arch", None)
    given = cfg.model_fields_set
    if arch not in PLAIN_ARCHS or any(name in given for name in RECIPE_FIELDS):
        return cfg
    return cfg.model_copy(update={key: value for key, value in PLAIN_RECIPE.items() if key not in given})


def epochs_for(cfg: Any, images: int) -> int:
    return cfg.epochs if cfg.epochs is not None else default_epochs(images)


def train_options(cfg: Any, images: int) -> TrainOptions:
    """The loop's options from any TrainConfig; `images` (per epoch) sets the default epoch count."""
    return TrainOptions(epochs=epochs_for(cfg, images), batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
                        schedule=cfg.schedule, seed=cfg.seed, deterministic=cfg.deterministic, device=cfg.device,
                        workers=cfg.workers, progress=cfg.progress, compile=cfg.compile,
                        checkpoint_seconds=60.0 * cfg.checkpoint_minutes)


def batch_augment(cfg: Any, size: int, mean, std, normalise: str = "mean_std") -> BatchAugment:
    """The batched augmentation of a ClassifierTrainConfig at training size `size`."""
    shift = cfg.shift if cfg.shift is not None else default_shift(size)
    return BatchAugment(mean=tuple(mean), std=tuple(std), min_scale=cfg.min_scale, shift=shift, flip=cfg.flip,
                        grayscale_prob=getattr(cfg, "grayscale_prob", 0.0), color_jitter=getattr(cfg, "color_jitter", 0.0),
                        normalise=normalise, size=size)


def classification_step(label_smoothing: float):
    """A step for a network that outputs logits (B, C) against int64 targets (B,)."""

    def step(network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, context: StepContext | None = None):
        logits = network(inputs)
        loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
        return loss, (logits.argmax(1) == targets).float().mean().item()

    return step
