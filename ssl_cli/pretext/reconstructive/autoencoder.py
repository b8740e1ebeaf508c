"""The autoencoder baseline (Hinton & Salakhutdinov 2006; denoising: Vincent et al. 2008): the trunk
encodes the image, a decoder rebuilds it, and the loss is the mean squared error to the clean image
(`ssl_cli.pretext.losses.reconstruction`). The survey's reconstructive family: what any
representation should beat, since it keeps whatever describes pixels best, not what tells images apart.

inputs: [noisy (B, 3, S, S), clean (B, 3, S, S)], made on the device from the uint8 images: the
clean view is the image with a random flip and a shift of up to S/14 px (normalised with ImageNet
mean/std); the noisy one is the same with a fraction `noise` of its pixels set to 0 (the mean:
masking noise, all channels of a pixel at once). noise=0 (the default) is the plain autoencoder.
Decoder: the dense tasks' upsampling decoder from the trunk's map to S x S (`UpsamplingDecoder`).

Options: noise [0, in [0, 1)], flip [true].
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from ssl_cli.data.batch_augment import BatchAugment
from ssl_cli.data.sources import ImageSource
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError
from ssl_cli.pretext.base import PretextTask, TaskInfo
from ssl_cli.pretext.contrastive.base import WholeImages, check_number
from ssl_cli.pretext.heads import UpsamplingDecoder
from ssl_cli.pretext.losses.reconstruction import reconstruction_loss
from ssl_cli.train.recipe import default_shift


class AutoencoderTask(PretextTask):
    name = "autoencoder"
    family: ClassVar[str] = "reconstructive"
    min_image_size = 8

    def __init__(self, image_size: int, noise: float = 0.0, flip: bool = True):
        super().__init__(image_size)
        check_number(self.name, "image_size", image_size, self.min_image_size, 4096, integer=True)
        check_number(self.name, "noise", noise, 0.0, 0.99)
        if not isinstance(flip, bool):
            raise UserError(f"{self.name}: flip must be true or false, got {flip!r}")
        self.noise, self.flip = float(noise), flip
        self.augment = BatchAugment(mean=IMAGENET_MEAN, std=IMAGENET_STD, shift=default_shift(image_size), flip=flip)

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, {"noise": self.noise, "flip": self.flip})

    def dataset(self, source: ImageSource, seed: int) -> WholeImages:
        return WholeImages(source, self.image_size)

    def batch_transform(self):
        def noisy_and_clean(images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
            clean = self.augment(images, generator)
            if not self.noise:
                return [clean, clean]
            keep = torch.rand(clean.shape[0], 1, *clean.shape[2:], generator=generator, device=clean.device) >= self.noise
            return [clean * keep, clean]

        return noisy_and_clean

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels, height, _ = trunk_shape
        return UpsamplingDecoder(channels, height, 3, self.image_size)

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[noisy, clean] (B, 3, S, S) each -> (reconstruction of the noisy one, the clean target), both (B, 3, S, S)."""
        noisy, clean = inputs
        return head(trunk(noisy)), clean

    def objective(self, head, output, target, context):
        reconstruction, clean = output
        return reconstruction_loss(reconstruction.float(), clean.float()), None
