"""`ssl finetune`: evaluate a representation on labelled images.

- `full`: conv layers start from the checkpoint, classifier layers are re-initialised, all is trained
  (layers up to `--freeze-through` stay fixed);
- `linear`: a frozen trunk, one linear classifier per probed layer, all trained in the same pass, each
  conv map average-pooled to at most `--linear-dims` values (the usual AlexNet protocol, ~9k) and, by
  default, standardised value by value first (`--linear-norm`);
- `knn`: cosine k-nearest neighbours on the features of one layer, votes weighted by exp(cos / T).
Writes `<out>/metrics.json` (top-1, top-5, per-class, per layer for linear) and, for `full`, the
finetuned checkpoint `<out>/finetuned.pt`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.feature_extraction import create_feature_extractor

from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.config import FinetuneConfig
from ssl_cli.data.batch_augment import normalise_mode
from ssl_cli.data.dataset import SourceDataset
from ssl_cli.data.resized import ResizedImages, stored_side
from ssl_cli.data.sources import ImageSource, open_source, source_input
from ssl_cli.data.transforms import eval_transform
from ssl_cli.device import autocast, inference_input, prepare_module, resolve_device
from ssl_cli.errors import UserError
from ssl_cli.models.layers import LayerReader
from ssl_cli.models.network import Network, network_from_checkpoint
from ssl_cli.models.projected import ProjectedNetwork
from ssl_cli.models.registry import build_model, check_layer
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.train import distributed
from ssl_cli.train.loop import StepContext, train
from ssl_cli.train.monitor import knn_scores
from ssl_cli.train.recipe import batch_augment, train_options


def eval_source_spec(data: str, eval_data: str | None, flag: str = "--data") -> str:
    """The evaluation source: `eval_data`, else the test split of a `fashion-mnist:` training source."""
    if eval_data:
        return eval_data
    if data.startswith("fashion-mnist:") and not data.endswith(":test"):
        return data.removesuffix(":train") + ":test"
    raise UserError(f"{flag} {data} has no test split of its own; pass --eval-data with labelled images")


def few_labels(targets: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """(N,) targets -> sorted indices of `per_class` images of every class, chosen by seed (all if None)."""
    known = np.flatnonzero(targets >= 0)
    if per_class is None:
        return known
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(targets[known]):
        members = np.flatnonzero(targets == label)
        if per_class > len(members):
            raise UserError(f"--labels-per-class {per_class} exceeds class {label}'s {len(members)} images; "
                            f"use at most {len(members)}")
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen))


def labelled_source(spec: str, role: str) -> ImageSource:
    source = open_source(spec, role)
    if not source.has_targets:
        raise UserError(f"{role} {spec} has no labels (a flat folder?); use class subfolders or a labelled dataset")
    return source


def scores(targets: np.ndarray, logits: np.ndarray, classes: int) -> dict[str, Any]:
    """(N,) targets, (N, C) scores -> top-1, top-5 and per-class accuracy."""
    order = np.argsort(-logits, axis=1)
    top1 = order[:, 0] == targets
    top5 = (order[:, : min(5, classes)] == targets[:, None]).any(axis=1)
    per_class = {int(c): float(top1[targets == c].mean()) for c in np.unique(targets)}
    return {"top1": float(top1.mean()), "top5": float(top5.mean()), "per_class": per_class, "n": int(len(targets))}


def embed(module: nn.Module, source: ImageSource, indices: np.ndarray, network: Network, device: torch.device,
          size: int, batch_size: int = 256, workers: int = 0) -> dict[str, torch.Tensor] | torch.Tensor:
    """Run `module` (frozen) over images `indices` with the network's eval transform at `size`;
    returns the (len(indices), ...) outputs concatenated (a dict of them for a dict-valued module)."""
    dataset = SourceDataset(source, eval_transform(size, network.mean, network.std, network.per_image_normalise,
                                                   network.input_mode), indices=indices, placeholder_shape=(3, size, size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    outputs: list = []
    module = prepare_module(module, device).eval()
    with torch.inference_mode():
        for images, _, _ in loader:
            with autocast(device):
                out = module(inference_input(images, device))
            outputs.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict) else out.float().cpu())
    if isinstance(outputs[0], dict):
        return {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}
    return torch.cat(outputs)


class LinearProbe(nn.Module):
    """A frozen trunk read at several layers, one linear classifier per layer on pooled maps.

    With `standardise`, each pooled value passes a batch norm without scale or shift before its
    classifier (MAE's linear probe). Without batch norm in the trunk, activations shrink layer by
    layer: in the demo's alexnet_lowres (width 0.25) conv5 varies 22x less across images than conv1,
    and a classifier trained for 24 steps at one learning rate cannot grow weights that large, so
    raw probes sat at chance on conv4-5 where a standardised logistic regression reads 0.99.
    Running statistics are a plain average over the batches seen (momentum None): a probe trains
    for few steps, and an exponential average would still remember its initial variance of 1.
    """

    def __init__(self, network: Network, layers: list[str], classes: int, max_dims: int, standardise: bool = True):
        super().__init__()
        nodes = {check_layer(network.spec, layer): layer for layer in layers}
        self.body = create_feature_extractor(network.model, return_nodes=nodes).eval().requires_grad_(False)
        with torch.no_grad():
            size = network.input_size
            shapes = {k: v.shape[1:] for k, v in self.body(torch.zeros(1, 3, size, size)).items()}
        self.pools = {}
        heads = {}
        for layer, shape in shapes.items():
            side = max(1, min(shape[-1], int(math.sqrt(max_dims / shape[0])))) if len(shape) == 3 else None
            self.pools[layer] = side
            dims = shape[0] * side * side if side else shape[0]
            norm = nn.BatchNorm1d(dims, eps=1e-6, affine=False, momentum=None)  # eps as MAE: var 2e-5 at conv5 here
            heads[layer] = nn.Sequential(norm, nn.Linear(dims, classes)) if standardise else nn.Linear(dims, classes)
        self.heads = nn.ModuleDict(heads)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.body.eval()  # BatchNorm statistics of the trunk never move
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            maps = self.body(images)
        out = {}
        for layer, value in maps.items():
            side = self.pools[layer]
            pooled = nn.functional.adaptive_avg_pool2d(value, side).flatten(1) if side else value.flatten(1)
            out[layer] = self.heads[layer](pooled)
        return out


def full_model(network: Network, classes: int, freeze_through: str | None) -> nn.Module:
    """The checkpoint's arch with `classes` outputs: trunk weights loaded, classifier re-initialised.
    A SimCLRv2 network keeps its projection block (the paper finetunes from proj1)."""
    model = build_model(network.spec.name, **network.resolved_kwargs(num_classes=classes))
    if network.projection is not None:
        model = ProjectedNetwork(model, network.projection["d_in"], network.projection["width"], classes)
    own = model.state_dict()
    trunk = {k: v for k, v in network.model.state_dict().items()
             if not k.startswith(("classifier.", "fc.", "backbone.classifier.", "backbone.fc."))
             and k in own and own[k].shape == v.shape}
    model.load_state_dict(trunk, strict=False)
    if freeze_through:
        node = check_layer(network.spec, freeze_through)
        frozen = []
        for name, module in model.named_modules():
            if name == node:
                frozen.append(name)
                break
            if not node.startswith(name + "."):  # an ancestor (features, backbone) also holds later layers
                frozen.append(name)
        for name, parameter in model.named_parameters():
            if any(name.startswith(prefix + ".") for prefix in frozen if prefix):
                parameter.requires_grad_(False)
    return model


def provenance_for(cfg: FinetuneConfig, network: Network, source: ImageSource, evaluation: ImageSource):
    return make_provenance("checkpoint", "finetune", cfg.recorded_config(),
                           cfg.result_config() | {"eval": evaluation.fingerprint,
                                                  "arch_kwargs_resolved": network.resolved_kwargs()},
                           [*network.inputs, source_input(source), source_input(evaluation)])


def provenance(cfg: FinetuneConfig):
    return provenance_for(cfg, network_from_checkpoint(cfg.model), labelled_source(cfg.data, "--data"),
                          labelled_source(eval_source_spec(cfg.data, cfg.eval_data), "--eval-data"))


def recorded_fingerprint(cfg: FinetuneConfig) -> str | None:
    """The fingerprint of the metrics.json in --out (the stage's output is a folder)."""
    metrics_file = cfg.out / "metrics.json"
    return json.loads(metrics_file.read_text()).get("fingerprint") if metrics_file.exists() else None


@claim_scope()
def run(cfg: FinetuneConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    network = network_from_checkpoint(cfg.model)
    source = labelled_source(cfg.data, "--data")
    evaluation = labelled_source(eval_source_spec(cfg.data, cfg.eval_data), "--eval-data")
    classes = int(max(source.targets.max(), evaluation.targets.max()) + 1)
    chosen = few_labels(source.targets, cfg.labels_per_class, cfg.seed)
    eval_indices = np.flatnonzero(evaluation.targets >= 0)
    layers = cfg.layers or ([network.feature_layer or network.spec.feature_layer] if cfg.mode == "knn"
                            else list(network.spec.conv_layers))
    for layer in layers:
        check_layer(network.spec, layer)
    provenance = provenance_for(cfg, network, source, evaluation)
    claim_output(cfg.out)  # one writer per folder, rank 0 under torchrun (see artifacts.lock)
    metrics_file = cfg.out / "metrics.json"
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"--out {cfg.out} is a file; finetune writes a folder (metrics.json and checkpoints)")
    if metrics_file.exists() and not cfg.force:
        if recorded_fingerprint(cfg) == provenance.fingerprint:
            reporter.info(f"{metrics_file} is up to date; skipped")
            return StageResult("finetune", cfg.out, "up to date", summary_of(json.loads(metrics_file.read_text())))
        raise UserError(f"{metrics_file} exists with another fingerprint; pass --force or choose another --out")
    device = resolve_device(cfg.device)
    eval_targets = evaluation.targets[eval_indices]
    if cfg.mode == "knn":
        reader = LayerReader(network.model, network.spec, layers[0])
        size = cfg.image_size or network.input_size
        train_x = embed(reader, source, chosen, network, device, size, cfg.eval_batch_size, cfg.workers)
        test_x = embed(reader, evaluation, eval_indices, network, device, size, cfg.eval_batch_size, cfg.workers)
        result = {layers[0]: scores(eval_targets, knn_scores(train_x, torch.from_numpy(source.targets[chosen]),
                                                             test_x, classes, cfg.knn_k, cfg.knn_temperature), classes)}
    else:
        result = train_and_score(cfg, network, source, chosen, evaluation, eval_indices, classes, layers, device,
                                 provenance, reporter)
    report = {"fingerprint": provenance.fingerprint, "mode": cfg.mode, "model": str(cfg.model),
              "train_images": int(len(chosen)), "eval_images": int(len(eval_indices)), "classes": classes,
              "layers": result, "config": cfg.recorded_config()}
    if distributed.launched_world()[0] == 0:  # under torchrun every rank evaluates; rank 0 writes
        cfg.out.mkdir(parents=True, exist_ok=True)
        tmp = metrics_file.with_name("metrics.json.tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, metrics_file)
    return StageResult("finetune", cfg.out, "written", summary_of(report))


def train_and_score(cfg, network, source, chosen, evaluation, eval_indices, classes, layers, device, provenance,
                    reporter) -> dict[str, Any]:
    size = cfg.image_size or network.input_size
    dataset = ResizedImages(source, chosen, source.targets[chosen].astype(np.int64), size,
                            stored_size=stored_side(source, size, crops=cfg.min_scale < 1))
    options = train_options(cfg, len(chosen))
    if cfg.mode == "linear":
        if cfg.linear_norm and options.batch_size < 2:
            raise UserError("--linear-norm standardises over a batch: use --batch-size 2 or more, or --no-linear-norm")
        model: nn.Module = LinearProbe(network, layers, classes, cfg.linear_dims, cfg.linear_norm)
    else:
        model = full_model(network, classes, cfg.freeze_through)

    def step(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, context: StepContext | None = None):
        out = module(inputs)
        out = out if isinstance(out, dict) else {"logits": out}
        loss = sum(nn.functional.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
                   for logits in out.values())
        accuracy = float(np.mean([(o.argmax(1) == targets).float().mean().item() for o in out.values()]))
        return loss, accuracy

    def final_payload(module: nn.Module) -> dict[str, Any]:
        described = network.describe(num_classes=classes)
        state = module.state_dict() if cfg.mode == "full" else module.heads.state_dict()
        return {"meta": {**described, "task": f"finetune-{cfg.mode}", "classes": classes}, "model": state}

    out = cfg.out / ("finetuned.pt" if cfg.mode == "full" else "linear.pt")
    augment = batch_augment(cfg, size, network.mean, network.std,
                            normalise_mode(network.input_mode, network.per_image_normalise))
    train(model, dataset, step, options, out, provenance, final_payload, force=cfg.force, reporter=reporter,
          batch_transform=augment)
    trained = torch.load(out, weights_only=True)["model"]
    if cfg.mode == "full":
        model.load_state_dict(trained)
    else:
        model.heads.load_state_dict(trained)
    model.eval()
    outputs = embed(model, evaluation, eval_indices, network, device, size, cfg.eval_batch_size, cfg.workers)
    outputs = outputs if isinstance(outputs, dict) else {"logits": outputs}
    targets = evaluation.targets[eval_indices]
    return {layer: scores(targets, logits.numpy(), classes) for layer, logits in outputs.items()}


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    rows = {f"{layer} top1": round(values["top1"], 4) for layer, values in report["layers"].items()}
    return {"mode": report["mode"], "train_images": report["train_images"], "eval_images": report["eval_images"], **rows}
