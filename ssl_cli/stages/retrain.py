"""`ssl retrain`: the target arch learns the pseudo-labels (cluster ids) from scratch (Noroozi et al. 2018).

Only the cluster association is transferred, not the teacher's outputs: this is not distillation.
The labels may come from clusters fitted on another dataset; they join `--data` by sample id.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_cli.artifacts.h5 import H5Artifact
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.config import RetrainConfig
from ssl_cli.data.labelled import join_by_id
from ssl_cli.data.resized import ResizedImages, stored_side
from ssl_cli.data.sources import open_source, source_input
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.models.registry import build_model, get_arch, resolved_kwargs
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.train.loop import metrics_path, train
from ssl_cli.train.recipe import batch_augment, classification_step, train_options, training_size, with_arch_recipe


def read_labels(cfg: RetrainConfig) -> tuple[np.ndarray, np.ndarray, int, dict[str, str]]:
    """(M,) sample ids, (M,) int64 labels, the number of classes k, and the labels' input record."""
    with H5Artifact(cfg.labels, "labels", required=("labels", "sample_ids")) as labels:
        k = int(labels.attrs.get("k") or labels.array("labels").max() + 1)
        record = {"path": str(cfg.labels), "fingerprint": labels.fingerprint}
        return labels.strings("sample_ids"), labels.array("labels").astype(np.int64), k, record


def arch_kwargs(cfg: RetrainConfig, classes: int) -> dict[str, Any]:
    return {"num_classes": classes, **({"width": cfg.width} if cfg.width is not None else {})}


def provenance_for(cfg: RetrainConfig, source, labels_record: dict[str, str]):
    # num_classes comes from the data (an input); the other options' defaults enter here
    resolved = resolved_kwargs(cfg.arch, arch_kwargs(cfg, 0))
    return make_provenance("checkpoint", "retrain", cfg.recorded_config(),
                           cfg.result_config() | {"arch_kwargs_resolved": resolved},
                           [source_input(source), labels_record])


def provenance(cfg: RetrainConfig):
    cfg = with_arch_recipe(cfg)  # as run() does
    return provenance_for(cfg, open_source(cfg.data), read_labels(cfg)[3])


def run(cfg: RetrainConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    cfg = with_arch_recipe(cfg)  # a plain vgg16/alexnet defaults to its papers' SGD recipe (train/recipe.py)
    source = open_source(cfg.data)
    ids, labels, classes, record = read_labels(cfg)
    indices = join_by_id(source, ids, str(cfg.labels))
    spec = get_arch(cfg.arch)
    size = training_size(spec, source, cfg.image_size)
    record_all = provenance_for(cfg, source, record)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, **arch_kwargs(cfg, classes))
    # position p: image indices[p], label labels[p]; random resized crops come from the stored image
    dataset = ResizedImages(source, indices, labels, size, stored_size=stored_side(source, size, crops=cfg.min_scale < 1))
    options = train_options(cfg, len(dataset))
    weights = None
    if cfg.sampling == "uniform":
        counts = np.bincount(labels, minlength=classes)
        weights = torch.from_numpy(1.0 / counts[labels]).double()

    def final_payload(network: nn.Module) -> dict[str, Any]:
        return {"meta": {"arch": cfg.arch, "arch_kwargs": arch_kwargs(cfg, classes), "input_size": size,
                         "arch_kwargs_resolved": resolved_kwargs(cfg.arch, arch_kwargs(cfg, classes)),
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "task": "retrain",
                         "classes": classes, "feature_layer": spec.feature_layer},
                "model": network.state_dict()}

    result = train(model, dataset, classification_step(cfg.label_smoothing), options, cfg.out, record_all,
                   final_payload, force=cfg.force, reporter=reporter, sample_weights=weights,
                   batch_transform=batch_augment(cfg, size, IMAGENET_MEAN, IMAGENET_STD), chance_loss=math.log(classes))
    last = result.history[-1] if result.history else {}
    summary = {"arch": cfg.arch, "classes": classes, "images": len(indices), "sampling": cfg.sampling,
               "loss": last.get("loss"), "accuracy": last.get("accuracy"),
               "images_per_second": last.get("images_per_second"), "metrics": str(metrics_path(cfg.out))}
    return StageResult("retrain", cfg.out, result.status, {k: v for k, v in summary.items() if v is not None})
