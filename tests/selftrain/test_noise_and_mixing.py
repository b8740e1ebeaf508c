"""The noised student (dropout, stochastic depth, RandAugment) and the labelled : pseudo batch mix."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ssl_cli.data.resized import to_uint8
from ssl_cli.data.sources import open_source
from ssl_cli.models.registry import build_model
from ssl_cli.selftrain.mixed import MixedDataset
from ssl_cli.selftrain.noise import add_noise


def test_noise_keeps_the_state_dict_and_vanishes_in_eval_mode():
    torch.manual_seed(0)
    plain = build_model("resnet18_lowres", num_classes=4)
    noisy = build_model("resnet18_lowres", num_classes=4)
    noisy.load_state_dict(plain.state_dict())
    changed = add_noise(noisy, dropout=0.5, depth_drop=0.5)
    assert changed == {"dropout_layers": 1, "stochastic_depth_blocks": 8}
    assert noisy.state_dict().keys() == plain.state_dict().keys()
    images = torch.randn(16, 3, 32, 32)
    plain.eval(), noisy.eval()
    with torch.no_grad():
        assert torch.allclose(noisy(images), plain(images))
        noisy.train()
        first, second = noisy(images), noisy(images)
    assert not torch.allclose(first, second)  # dropout and dropped blocks differ from pass to pass


def test_stochastic_depth_drops_whole_residual_branches_per_sample():
    model = build_model("resnet18_lowres", num_classes=4).train()
    add_noise(model, dropout=0.0, depth_drop=0.999)
    last = model.layer4[1]
    seen = []
    last.bn2.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    model(torch.randn(32, 3, 32, 32))
    zeroed = (seen[0].flatten(1).abs().sum(1) == 0).float().mean()
    assert zeroed > 0.9  # the last block's branch is dropped with p ~ 0.999, row by row


def test_dropout_layers_of_alexnet_take_the_students_rate():
    model = build_model("alexnet_lowres", num_classes=4, width=0.25)
    assert add_noise(model, dropout=0.3, depth_drop=0.2) == {"dropout_layers": 2, "stochastic_depth_blocks": 0}
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]


def test_items_are_the_plain_uint8_images_at_the_training_size(toy_dir):
    # the noise is the batch's (drawn on the device by step); an item is the decoded, resized image
    dataset = _mixed(toy_dir, ratio=1, size=24)
    images, _, group, ok = dataset[3]
    labelled, (pseudo,) = dataset.members(3)
    source = open_source(str(toy_dir))
    assert images.shape == (2, 3, 24, 24) and images.dtype == torch.uint8 and ok and dataset.in_memory
    assert torch.equal(images[0], to_uint8(source.load(labelled), 24))
    assert torch.equal(images[1], to_uint8(source.load(10 + pseudo), 24))
    assert torch.equal(_mixed(toy_dir, ratio=1, size=24, memory_budget=0)[3][0], images)  # decoded per item: the same


def _mixed(toy_dir, ratio: int, pseudo: int = 40, seed: int = 0, size: int = 32, **kwargs) -> MixedDataset:
    source = open_source(str(toy_dir))
    labelled = np.arange(8)
    rows = np.arange(10, 10 + pseudo)
    targets = np.eye(4, dtype=np.float32)[source.targets[rows]]
    return MixedDataset(source, labelled, source.targets[labelled], source, rows, targets, 4, ratio, size, seed, **kwargs)


def test_every_group_is_one_labelled_image_then_ratio_pseudo_labelled_ones(toy_dir):
    dataset = _mixed(toy_dir, ratio=3)
    assert len(dataset) == max(8, -(-40 // 3))  # pseudo-labelled images seen once per epoch, labelled ones cycle
    images, targets, group, ok = dataset[5]
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4, 4) and ok
    assert torch.allclose(targets.sum(1), torch.ones(4))
    pseudo_seen = sorted(p for g in range(len(dataset)) for p in dataset.members(g)[1])
    assert set(pseudo_seen) == set(range(40))


def test_groups_replay_for_the_same_epoch_and_change_with_it(toy_dir):
    a, b = _mixed(toy_dir, ratio=2), _mixed(toy_dir, ratio=2)
    b.set_epoch(3), b.set_epoch(0)
    assert torch.equal(a[7][0], b[7][0])  # a fresh dataset (another worker, a resumed run) builds the same group
    b.set_epoch(1)
    assert a.members(7) != b.members(7)
