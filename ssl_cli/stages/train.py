"""`ssl train`: an arch learns labelled images from scratch: the supervised baseline every results
table reads the other rows against, and a first teacher for `ssl self-train --teacher`.

Writes `OUT` (a model checkpoint that extract, finetune, export and self-train take), the loop's
`<stem>.metrics.jsonl`, and `<stem>.eval.json`: top-1, top-5 and per-class accuracy on the
evaluation images (the test split of a fashion-mnist source, or --eval-data), re-used when up to date.
"""

from __future__ import annotations

import math
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.config import NO_EVALUATION, SupervisedConfig
from ssl_cli.data.resized import ResizedImages, stored_side
from ssl_cli.data.sources import ImageSource, source_input
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.device import resolve_device
from ssl_cli.errors import UserError
from ssl_cli.models.network import network_from_checkpoint
from ssl_cli.models.registry import build_model, get_arch, resolved_kwargs
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.stages.finetune import embed, eval_source_spec, few_labels, labelled_source, scores
from ssl_cli.train import distributed
from ssl_cli.train.loop import metrics_path, train
from ssl_cli.train.recipe import batch_augment, classification_step, epochs_for, train_options, training_size, with_arch_recipe


def eval_path(out: Path) -> Path:
    return out.with_name(out.stem + ".eval.json")


def arch_kwargs(cfg: SupervisedConfig, classes: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": classes}
    if cfg.width is not None:
        kwargs["width"] = cfg.width
    if cfg.dropout is not None:
        kwargs["dropout"] = cfg.dropout
    return kwargs


def evaluation_source(cfg: SupervisedConfig) -> ImageSource | None:
    """The labelled evaluation images, or None for `--eval-data none` or a training source without a test split."""
    if cfg.eval_data == NO_EVALUATION:
        return None
    try:
        spec = eval_source_spec(cfg.data, cfg.eval_data)
    except UserError:
        return None
    return labelled_source(spec, "--eval-data")


def provenance_for(cfg: SupervisedConfig, source: ImageSource) -> Provenance:
    # num_classes comes from the data (an input); the other options' defaults enter here
    resolved = resolved_kwargs(cfg.arch, arch_kwargs(cfg, 0))
    return make_provenance("checkpoint", "train", cfg.recorded_config(),
                           cfg.result_config() | {"arch_kwargs_resolved": resolved},
                           [source_input(source)])


def provenance(cfg: SupervisedConfig) -> Provenance:
    cfg = with_arch_recipe(cfg)  # as run() does
    return provenance_for(cfg, labelled_source(cfg.data, "--data"))


@claim_scope()  # the checkpoint stays locked until its evaluation is written (see artifacts.lock)
def run(cfg: SupervisedConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    cfg = with_arch_recipe(cfg)  # a plain vgg16/alexnet defaults to its papers' SGD recipe (train/recipe.py)
    source = labelled_source(cfg.data, "--data")
    evaluation = evaluation_source(cfg)
    classes = int(source.targets.max() + 1)
    if evaluation is not None and evaluation.targets.max() >= classes:
        raise UserError(f"--eval-data has class {int(evaluation.targets.max())} but --data has {classes} classes; "
                        "evaluate on the same classes")
    spec = get_arch(cfg.arch)
    size = training_size(spec, source, cfg.image_size)
    chosen = few_labels(source.targets, cfg.labels_per_class, cfg.seed)
    record = provenance_for(cfg, source)
    kwargs = arch_kwargs(cfg, classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, **kwargs)
    dataset = ResizedImages(source, chosen, source.targets[chosen].astype(np.int64), size,
                            stored_size=stored_side(source, size, crops=cfg.min_scale < 1))
    options = train_options(cfg, len(chosen))

    def final_payload(network) -> dict[str, Any]:
        return {"meta": {"arch": cfg.arch, "arch_kwargs": kwargs, "arch_kwargs_resolved": resolved_kwargs(cfg.arch, kwargs),
                         "input_size": size, "mean": list(IMAGENET_MEAN),
                         "std": list(IMAGENET_STD), "task": "train", "classes": classes,
                         "class_names": list(source.classes), "feature_layer": spec.feature_layer,
                         "labelled_images": int(len(chosen))},
                "model": network.state_dict()}

    result = train(model, dataset, classification_step(cfg.label_smoothing), options, cfg.out, record, final_payload,
                   force=cfg.force, reporter=reporter, chance_loss=math.log(classes),
                   batch_transform=batch_augment(cfg, size, IMAGENET_MEAN, IMAGENET_STD))
    last = result.history[-1] if result.history else {}
    summary = {"arch": cfg.arch, "classes": classes, "images": int(len(chosen)), "epochs": epochs_for(cfg, len(chosen)),
               "loss": last.get("loss"), "train accuracy": last.get("accuracy"),
               "images_per_second": last.get("images_per_second"), "metrics": str(metrics_path(cfg.out))}
    if evaluation is not None and distributed.launched_world()[0] == 0:
        report = evaluate(cfg, evaluation, classes, reporter)
        summary |= {"eval top1": report["top1"], "eval top5": report["top5"], "eval": str(eval_path(cfg.out))}
    return StageResult("train", cfg.out, result.status, {k: v for k, v in summary.items() if v is not None})


def evaluate(cfg: SupervisedConfig, evaluation: ImageSource, classes: int, reporter: Reporter) -> dict[str, Any]:
    """`<stem>.eval.json`: the checkpoint's accuracy on the evaluation images (skipped when up to date)."""
    network = network_from_checkpoint(cfg.out)
    fingerprint = make_provenance("checkpoint", "train-eval", {}, {"eval": evaluation.fingerprint},
                                  network.inputs).fingerprint
    path = eval_path(cfg.out)
    if path.exists() and not cfg.force:
        report = json.loads(path.read_text())
        if report.get("fingerprint") == fingerprint:
            return report
    indices = np.flatnonzero(evaluation.targets >= 0)
    logits = embed(network.model, evaluation, indices, network, resolve_device(cfg.device), network.input_size,
                   cfg.eval_batch_size, cfg.workers)
    report = {"fingerprint": fingerprint, "checkpoint": str(cfg.out), "eval_data": evaluation.spec,
              **scores(evaluation.targets[indices], logits.numpy(), classes)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    reporter.info(f"top-1 {report['top1']:.4f} on {report['n']} evaluation images ({evaluation.spec})")
    return report
