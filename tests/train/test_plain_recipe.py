"""Full-size archs without batch norm default to their papers' SGD recipe, which learns; what the
user sets is kept, and the recipe that ran is what the checkpoint records."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from rows import InMemoryRows, classification_step
from torch import nn

from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.config import PretextConfig, RetrainConfig, resolve
from ssl_cli.errors import UserError
from ssl_cli.models.registry import build_model
from ssl_cli.stages import pretext
from ssl_cli.train.loop import train
from ssl_cli.train.recipe import PLAIN_RECIPE, train_options, with_arch_recipe


def pretext_config(**flags) -> PretextConfig:
    return resolve(PretextConfig, None, {"task": "jigsawpp", "data": "TOY", "out": "p.pt", **flags})


@pytest.mark.parametrize("arch", ["vgg16", "alexnet"])
def test_plain_full_size_archs_get_the_sgd_recipe_when_lr_and_optimizer_are_unset(arch):
    cfg = with_arch_recipe(pretext_config(arch=arch, weight_decay=1e-3))
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.schedule) == ("sgd", 0.01, 0.9, "cosine")
    assert cfg.weight_decay == 1e-3  # the user's value stays
    assert cfg.result_config()["optimizer"] == "sgd"  # the fingerprint covers what runs
    assert with_arch_recipe(cfg) == cfg


@pytest.mark.parametrize("flags", [{"arch": "vgg16", "lr": 0.002}, {"arch": "vgg16", "optimizer": "adamw"},
                                   {"arch": "vgg16_bn"}, {"arch": "vgg16_lowres"}, {"arch": "resnet18"}])
def test_a_chosen_recipe_and_other_archs_are_left_alone(flags):
    cfg = pretext_config(**flags)
    assert with_arch_recipe(cfg) is cfg
    retrain = resolve(RetrainConfig, None, {"labels": "l.h5", "data": "TOY", "arch": "alexnet_bn_lowres", "out": "s.pt"})
    assert with_arch_recipe(retrain) is retrain


class RedderImages(InMemoryRows):
    """64 noisy 32 px images; class 1 is redder. (inputs, target, index, ok) like every training dataset."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.y = torch.arange(64) % 2
        colour = torch.rand(64, 3, 1, 1, generator=generator) * 0.5
        colour[:, 0] += 0.5 * self.y[:, None, None]
        self.x = (colour + 0.2 * torch.randn(64, 3, 32, 32, generator=generator) - 0.5) / 0.25


step = classification_step


def test_the_plain_vgg16_default_recipe_learns_below_chance(tmp_path):
    # The recipe `ssl pretext --arch vgg16` resolves to, on VGG16's own plain 13-conv stack (torchvision's layers
    # and init) at 1/8 width so the test stays fast, with a fresh linear head as a pretext task puts on it.
    options = replace(train_options(with_arch_recipe(pretext_config(arch="vgg16", epochs=3)), 64), batch_size=16,
                      workers=0, progress=False, deterministic=True)
    assert (options.optimizer, options.lr) == (PLAIN_RECIPE["optimizer"], PLAIN_RECIPE["lr"])
    torch.manual_seed(0)
    trunk = build_model("vgg16_lowres", width=0.125).features
    assert not any(isinstance(module, nn.BatchNorm2d) for module in trunk.modules())
    model = nn.Sequential(trunk, nn.Flatten(1), nn.Linear(64, 2))
    result = train(model, RedderImages(), step, options, tmp_path / "m.pt",
                   make_provenance("checkpoint", "test", {}, {}, []), lambda m: {"model": m.state_dict()},
                   chance_loss=math.log(2))
    assert result.history[-1]["loss"] < 0.6 * math.log(2) and result.history[-1]["accuracy"] > 0.8


def test_a_pretext_run_at_a_huge_rate_is_stopped_as_diverged(toy_dir, tmp_path):
    cfg = resolve(PretextConfig, None, {"task": "rotation", "arch": "alexnet_lowres", "width": 0.25, "image_size": 32,
                                        "data": str(toy_dir), "out": str(tmp_path / "p.pt"), "epochs": 2,
                                        "batch_size": 16, "lr": 10.0, "optimizer": "sgd", "schedule": "constant",
                                        "workers": 0, "progress": False, "device": "cpu"})
    with pytest.raises(UserError, match=r"training diverged at epoch 1, step \d+: .*lower --lr \(it was 10 with sgd\)"):
        pretext.run(cfg)
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "p.pt.partial").exists()
