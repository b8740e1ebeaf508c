"""`ssl pretext`: a backbone learns a pretext task (handcrafted, contrastive or reconstructive) with the
shared training loop.

The checkpoint holds the backbone's state dict in the registry arch's layout (plus the task head,
with whatever the method keeps between steps: momentum encoder, queue, memory bank), and records
arch, input size, normalisation, task and task options (the permutation set for jigsaw), so
`ssl extract --model pretext.pt` needs no other flag. With `--monitor-data`, a kNN top-1 of the
trunk's features on labelled images joins the metrics every `--monitor-every` epochs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.outputs import plan_output
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.config import PretextConfig
from ssl_cli.data.batch_augment import normalise_mode
from ssl_cli.data.sources import ImageSource, open_source, source_input
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError
from ssl_cli.models.network import trained_state, untrained_record
from ssl_cli.models.registry import build_model, get_arch, resolved_kwargs
from ssl_cli.pretext.base import PretextNetwork, PretextTask
from ssl_cli.pretext.registry import task_class
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.train.loop import StepContext, metrics_path, train
from ssl_cli.train.monitor import KnnMonitor
from ssl_cli.train.recipe import train_options, training_size, with_arch_recipe


def image_size(cfg: PretextConfig, cls: type[PretextTask], source: ImageSource) -> int:
    """Handcrafted defaults: the papers' 225-px crops for jigsaw; for context a crop whose ~S/4 patches
    the trunk accepts; otherwise the arch's input size. Methods that see whole images (contrastive,
    reconstructive) train at the images' own size when the arch takes it, like `ssl train`."""
    spec = get_arch(cfg.arch)
    if cls.family != "handcrafted":
        return training_size(spec, source, cfg.image_size)
    defaults = {"jigsaw": 225, "jigsawpp": 225, "context": max(spec.input_size, 4 * spec.min_input_size + 8)}
    return cfg.image_size or defaults.get(cfg.task, spec.input_size)


def make_task(cfg: PretextConfig, source: ImageSource) -> PretextTask:
    cls = task_class(cfg.task)
    try:
        return cls(image_size=image_size(cfg, cls, source), **cfg.task_options)
    except TypeError as error:
        raise UserError(f"task {cfg.task}: bad task option ({error}); see `ssl pretext --help`") from None


def arch_kwargs(cfg: PretextConfig) -> dict[str, Any]:
    return {"width": cfg.width} if cfg.width is not None else {}


def provenance(cfg: PretextConfig):
    cfg = with_arch_recipe(cfg)  # as run() does: a plain vgg16/alexnet defaults to SGD
    source = open_source(cfg.data)
    return _provenance(cfg, source, make_task(cfg, source))


def _provenance(cfg: PretextConfig, source, task: PretextTask):
    return make_provenance("checkpoint", "pretext", cfg.recorded_config(),
                           cfg.result_config() | {"task_info": task.info().options,
                                                  "arch_kwargs_resolved": resolved_kwargs(cfg.arch, arch_kwargs(cfg))},
                           [source_input(source)])


def normalisation(task: PretextTask) -> str:
    """How the trunk's inputs were normalised (BatchAugment's `normalise`), for the monitor."""
    return normalise_mode(task.input_mode, task.per_image_normalise)


def make_epoch_end(cfg: PretextConfig, task: PretextTask, network: PretextNetwork, epochs: int):
    """The epoch-end figures: the task's own, and the kNN monitor of --monitor-data (always measured after
    the last of `epochs`)."""
    monitor = None
    if cfg.monitor_data is not None:
        monitor = KnnMonitor.from_source(open_source(cfg.monitor_data), task.tile_size(), IMAGENET_MEAN, IMAGENET_STD,
                                         cfg.monitor_every, normalisation(task), cfg.seed)

    def epoch_end(epoch: int, model: nn.Module) -> dict[str, float]:
        figures = task.epoch_end(network, epoch)
        if monitor is not None and monitor.due(epoch, epochs):
            figures.update(monitor(network.trunk, network, next(network.parameters()).device))
        return figures

    return epoch_end


@claim_scope()  # the output stays locked at least until run returns (see artifacts.lock)
def run(cfg: PretextConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    cfg = with_arch_recipe(cfg)  # a plain vgg16/alexnet defaults to its papers' SGD recipe (train/recipe.py)
    source = open_source(cfg.data)
    task = make_task(cfg, source)
    record = _provenance(cfg, source, task)
    if not plan_output(cfg.out, record.fingerprint, cfg.force).up_to_date:  # an up-to-date run trains nothing
        for message in task.caveats(source):
            reporter.warn(message)
    dataset = task.dataset(source, cfg.seed)  # first: a method may size its state by it (MoCo's queue)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = build_model(cfg.arch, **arch_kwargs(cfg))
        network = PretextNetwork(backbone, task)

    def step(model: nn.Module, inputs: Any, targets: torch.Tensor, context: StepContext):
        output = model(inputs)
        # losses in float32: at T = 0.07 against thousands of negatives, bf16 logits are off by 0.01-0.06
        with torch.autocast(context.indices.device.type, enabled=False):
            return task.objective(network.head, output, targets, context)

    def final_payload(model: PretextNetwork) -> dict[str, Any]:
        info = task.info()
        # copies of the backbone inside the head (MoCo's key encoder) carry the same untrained classifier
        copies = [name for name, module in model.head.named_modules() if type(module) is type(model.backbone)]
        head_untrained = tuple(f"{copy}.{name}" for copy in copies for name in model.untrained)
        return {
            "meta": {
                "arch": cfg.arch, "arch_kwargs": arch_kwargs(cfg), "input_size": task.image_size,
                "arch_kwargs_resolved": resolved_kwargs(cfg.arch, arch_kwargs(cfg)),
                "untrained": untrained_record(model.untrained, cfg.seed) | {"head_modules": list(head_untrained)},
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "per_image_normalise": task.per_image_normalise, "input_mode": task.input_mode,
                "feature_layer": get_arch(cfg.arch).trunk_layer,
                "task": info.name, "task_family": task.family, "task_options": info.options,
                "trunk_shape": list(model.trunk_shape), **task.meta(),
            },
            "model": trained_state(model.backbone, model.untrained),
            "head": trained_state(model.head, head_untrained),
        }

    options = train_options(cfg, len(dataset))
    result = train(network, dataset, step, options, cfg.out, record, final_payload, force=cfg.force, reporter=reporter,
                   batch_transform=task.batch_transform(), after_step=lambda context: task.after_step(network, context),
                   epoch_end=make_epoch_end(cfg, task, network, options.epochs),
                   epoch_start=lambda epoch, optimizer: task.epoch_start(network, epoch, optimizer),
                   chance_loss=task.chance_loss())
    last = result.history[-1] if result.history else {}
    summary = {"task": cfg.task, "arch": cfg.arch, "epochs": options.epochs, "loss": last.get("loss"),
               "accuracy": last.get("accuracy"), "knn_top1": last.get("knn_top1"),
               "images_per_second": last.get("images_per_second"), "metrics": str(metrics_path(cfg.out)),
               "skipped": len(result.skipped)}
    return StageResult("pretext", cfg.out, result.status, {k: v for k, v in summary.items() if v is not None})
