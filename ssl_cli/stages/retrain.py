"""`ssl retrain`: the target arch learns the pseudo-labels (cluster ids) from scratch (Noroozi et al. 2018).

Only the cluster association is transferred, not the teacher's outputs: this is not distillation.
The labels may come from clusters fitted on another dataset; they join `--data` by sample id.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_cli.artifacts.h5 import H5Artifact
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.config import RetrainConfig
from ssl_cli.data.labelled import LabelledDataset, join_by_id, train_transform
from ssl_cli.data.sources import open_source, source_input
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError
from ssl_cli.models.registry import build_model, get_arch
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.stages.pretext import train_options
from ssl_cli.train.loop import metrics_path, train


def read_labels(cfg: RetrainConfig) -> tuple[np.ndarray, np.ndarray, int, dict[str, str]]:
    """(M,) sample ids, (M,) int64 labels, the number of classes k, and the labels' input record."""
    with H5Artifact(cfg.labels, "labels", required=("labels", "sample_ids")) as labels:
        k = int(labels.attrs.get("k") or labels.array("labels").max() + 1)
        record = {"path": str(cfg.labels), "fingerprint": labels.fingerprint}
        return labels.strings("sample_ids"), labels.array("labels").astype(np.int64), k, record


def arch_kwargs(cfg: RetrainConfig, classes: int) -> dict[str, Any]:
    return {"num_classes": classes, **({"width": cfg.width} if cfg.width is not None else {})}


def provenance_for(cfg: RetrainConfig, source, labels_record: dict[str, str]):
    return make_provenance("checkpoint", "retrain", cfg.model_dump(mode="json"), cfg.result_config(),
                           [source_input(source), labels_record])


def provenance(cfg: RetrainConfig):
    return provenance_for(cfg, open_source(cfg.data), read_labels(cfg)[3])


def run(cfg: RetrainConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    source = open_source(cfg.data)
    ids, labels, classes, record = read_labels(cfg)
    indices = join_by_id(source, ids, str(cfg.labels))
    spec = get_arch(cfg.arch)
    size = cfg.image_size or spec.input_size
    if size < spec.min_input_size:
        raise UserError(f"--image-size {size} is too small for {cfg.arch} (minimum {spec.min_input_size})")
    record_all = provenance_for(cfg, source, record)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, **arch_kwargs(cfg, classes))
    transform = train_transform(size, cfg.min_scale, cfg.flip, cfg.grayscale_prob, cfg.color_jitter)
    dataset = LabelledDataset(source, indices, labels, transform, cfg.seed)
    weights = None
    if cfg.sampling == "uniform":
        counts = np.bincount(labels, minlength=classes)
        weights = torch.from_numpy(1.0 / counts[labels]).double()

    def step(network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
        output = network(inputs)
        return nn.functional.cross_entropy(output, targets), (output.argmax(1) == targets).float().mean().item()

    def final_payload(network: nn.Module) -> dict[str, Any]:
        return {"meta": {"arch": cfg.arch, "arch_kwargs": arch_kwargs(cfg, classes), "input_size": size,
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "task": "retrain",
                         "classes": classes, "feature_layer": spec.feature_layer},
                "model": network.state_dict()}

    result = train(model, dataset, step, train_options(cfg), cfg.out, record_all, final_payload, force=cfg.force,
                   reporter=reporter, sample_weights=weights)
    last = result.history[-1] if result.history else {}
    summary = {"arch": cfg.arch, "classes": classes, "images": len(indices), "sampling": cfg.sampling,
               "loss": last.get("loss"), "accuracy": last.get("accuracy"),
               "images_per_second": last.get("images_per_second"), "metrics": str(metrics_path(cfg.out))}
    return StageResult("retrain", cfg.out, result.status, {k: v for k, v in summary.items() if v is not None})
