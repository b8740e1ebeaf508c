"""`ssl pretext`: a backbone learns a handcrafted pretext task with the shared training loop.

The checkpoint holds the backbone's state dict in the registry arch's layout (plus the task head),
and records arch, input size, normalisation, task and task options (the permutation set for
jigsaw), so `ssl extract --model pretext.pt` needs no other flag.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.config import PretextConfig
from ssl_cli.data.sources import open_source, source_input
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError
from ssl_cli.models.registry import build_model, get_arch
from ssl_cli.pretext.base import PretextNetwork, PretextTask
from ssl_cli.pretext.dataset import PretextDataset
from ssl_cli.pretext.registry import task_class
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.train.loop import metrics_path, train
from ssl_cli.train.recipe import epochs_for, train_options

# Tasks whose trunk saw each tile/patch normalised on its own; extraction does the same per image.
PER_IMAGE_NORMALISED = frozenset({"jigsaw", "jigsawpp", "context"})


def make_task(cfg: PretextConfig) -> PretextTask:
    cls = task_class(cfg.task)
    spec = get_arch(cfg.arch)
    # Defaults: the papers' 225-px crops for jigsaw; for context a crop whose ~S/4 patches the trunk
    # accepts; otherwise the arch's own input size.
    defaults = {"jigsaw": 225, "jigsawpp": 225, "context": max(spec.input_size, 4 * spec.min_input_size + 8)}
    size = cfg.image_size or defaults.get(cfg.task, spec.input_size)
    try:
        return cls(image_size=size, **cfg.task_options)
    except TypeError as error:
        raise UserError(f"task {cfg.task}: bad task option ({error}); see `ssl pretext --help`") from None


def arch_kwargs(cfg: PretextConfig) -> dict[str, Any]:
    return {"width": cfg.width} if cfg.width is not None else {}


def provenance(cfg: PretextConfig):
    source = open_source(cfg.data)
    task = make_task(cfg)
    return _provenance(cfg, source, task)


def _provenance(cfg: PretextConfig, source, task: PretextTask):
    return make_provenance("checkpoint", "pretext", cfg.model_dump(mode="json"),
                           cfg.result_config() | {"task_info": task.info().options}, [source_input(source)])


def run(cfg: PretextConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    source = open_source(cfg.data)
    task = make_task(cfg)
    record = _provenance(cfg, source, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = build_model(cfg.arch, **arch_kwargs(cfg))
        network = PretextNetwork(backbone, task)

    def step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
        output = model(inputs)
        return task.loss(output, targets), task.accuracy(output.detach(), targets)

    def final_payload(model: PretextNetwork) -> dict[str, Any]:
        info = task.info()
        return {
            "meta": {
                "arch": cfg.arch, "arch_kwargs": arch_kwargs(cfg), "input_size": task.image_size,
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "per_image_normalise": cfg.task in PER_IMAGE_NORMALISED,
                "input_mode": "lightness" if cfg.task == "colorization" else "rgb",
                "feature_layer": get_arch(cfg.arch).trunk_layer,
                "task": info.name, "task_options": info.options, "trunk_shape": list(model.trunk_shape),
            },
            "model": model.backbone.state_dict(),
            "head": model.head.state_dict(),
        }

    dataset = PretextDataset(source, task, cfg.seed)
    result = train(network, dataset, step, train_options(cfg, len(dataset)), cfg.out, record,
                   final_payload, force=cfg.force, reporter=reporter)
    last = result.history[-1] if result.history else {}
    summary = {"task": cfg.task, "arch": cfg.arch, "epochs": epochs_for(cfg, len(dataset)), "loss": last.get("loss"),
               "accuracy": last.get("accuracy"), "images_per_second": last.get("images_per_second"),
               "metrics": str(metrics_path(cfg.out)), "skipped": len(result.skipped)}
    return StageResult("pretext", cfg.out, result.status, {k: v for k, v in summary.items() if v is not None})
