"""The model noise a Noisy Student learns under: dropout before the classifier's linear layers and
stochastic depth in ResNets. The input noise (RandAugment, then shifts, crops and flips) is drawn per
batch on the device: `data.randaugment.BatchRandAugment` and `data.batch_augment.BatchAugment`.

Model noise is added with hooks and module attributes, never new parameters, so the student's
state dict keeps the registry's layout and loads anywhere a plain checkpoint of its arch does.
Every hook checks `module.training`: a student in eval mode (a teacher, or under evaluation) is
noise-free.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import stochastic_depth


def add_noise(model: nn.Module, dropout: float, depth_drop: float) -> dict[str, int]:
    """Make `model` noisy while training; returns what was changed, for the round's metrics.

    dropout: the p of every existing nn.Dropout (AlexNet/VGG classifiers); a model without one
        (ResNet) gets dropout on the input of its final `fc` layer.
    depth_drop: ResNet residual branches are dropped per sample, with probability rising linearly
        from 0 to `depth_drop` at the last block (Huang et al. 2016), surviving ones rescaled.
    """
    dropouts = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    for module in dropouts:
        module.p = dropout
    fc_dropout = 0
    if not dropouts and dropout and isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc.register_forward_pre_hook(
            lambda module, args: (nn.functional.dropout(args[0], dropout, module.training),))
        fc_dropout = 1
    blocks = [module for module in model.modules() if isinstance(module, (BasicBlock, Bottleneck))]
    if depth_drop:
        for depth, block in enumerate(blocks, start=1):
            last_norm = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            last_norm.register_forward_hook(_drop_branch(depth_drop * depth / len(blocks)))
    return {"dropout_layers": len(dropouts) + fc_dropout, "stochastic_depth_blocks": len(blocks) if depth_drop else 0}


def _drop_branch(p: float) -> Callable:
    """A forward hook on a block's last norm layer: its output is the residual branch, before the skip is added."""
    def hook(module: nn.Module, args, output):
        return stochastic_depth(output, p, "row", module.training)
    return hook
