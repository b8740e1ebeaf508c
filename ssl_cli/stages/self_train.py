"""`ssl self-train`: teacher-student rounds (Zoph et al. 2020; Xie et al. 2020, Noisy Student).

    DIR/round-0/  student.pt (trained on the labelled images only: the baseline and first teacher;
                  absent with --teacher), metrics.json
    DIR/round-r/  teacher-logits.h5 (the teacher on --unlabelled, no augmentation), labels.h5
                  (hard labels, confidence, soft probabilities with --soft, the policy's selection),
                  student.pt (noised: RandAugment, dropout, stochastic depth), metrics.json
    DIR/summary.json  accuracy per round next to its teacher's and the labelled-only baseline

The student of round r is the teacher of round r+1. Every file is a resumable stage of its own
with its own fingerprint, so a finished round is skipped, an interrupted one resumes, and adding
rounds or changing the pseudo-label policy keeps the files those settings do not reach.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_cli.artifacts.checkpoint import load_checkpoint
from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.config import SelfTrainConfig
from ssl_cli.data.randaugment import BatchRandAugment
from ssl_cli.data.sources import ImageSource, open_source, source_input
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.device import resolve_device
from ssl_cli.errors import UserError
from ssl_cli.models.network import network_from_checkpoint
from ssl_cli.models.registry import build_model, get_arch, resolved_kwargs
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.selftrain.labels import label_stats, read_pseudo_labels, teacher_logits, write_labels
from ssl_cli.selftrain.mixed import MixedDataset
from ssl_cli.selftrain.noise import add_noise
from ssl_cli.stages import StageResult
from ssl_cli.stages.finetune import embed, eval_source_spec, few_labels, labelled_source, scores
from ssl_cli.train import distributed
from ssl_cli.train.loop import StepContext, train
from ssl_cli.train.recipe import batch_augment, train_options, training_size


@dataclass(frozen=True)
class Arch:
    """An architecture to build: registry name, kwargs (num_classes included) and training input size."""

    name: str
    kwargs: dict[str, Any]
    size: int

    def resolved(self) -> dict[str, Any]:
        """Every builder option, defaults filled in: what the fingerprint and the checkpoint record."""
        return resolved_kwargs(self.name, self.kwargs)

    def parameters(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build_model(self.name, **self.kwargs).parameters())


@dataclass
class Prepared:
    cfg: SelfTrainConfig
    labelled: ImageSource
    unlabelled: ImageSource
    evaluation: ImageSource
    classes: int
    chosen: np.ndarray  # (L,) labelled source rows used
    eval_indices: np.ndarray  # (E,) evaluation rows with a target
    first: Arch | None  # round 0's arch, None with --teacher
    student: Arch
    inputs: list[dict[str, str]] = field(default_factory=list)

    def round_dir(self, r: int) -> Path:
        return self.cfg.out / f"round-{r}"

    def resolved_archs(self) -> dict[str, Any]:
        archs = {"first": self.first.resolved() if self.first else None, "student": self.student.resolved()}
        return {"arch_kwargs_resolved": archs}


def prepare(cfg: SelfTrainConfig) -> Prepared:
    """Open and check every input; writes nothing. Every bad input is a UserError here, before any work."""
    labelled = labelled_source(cfg.labelled, "--labelled")
    unlabelled = open_source(cfg.unlabelled, "--unlabelled")
    if not len(unlabelled):
        raise UserError(f"--unlabelled {cfg.unlabelled} has no images; self-training needs images to pseudo-label")
    evaluation = labelled_source(eval_source_spec(cfg.labelled, cfg.eval_data, "--labelled"), "--eval-data")
    classes = int(labelled.targets.max() + 1)
    eval_indices = np.flatnonzero(evaluation.targets >= 0)
    if evaluation.targets.max() >= classes:
        raise UserError(f"--eval-data has class {int(evaluation.targets.max())} but the labelled data has {classes} "
                        "classes (0..{}); evaluate on the same classes".format(classes - 1))
    chosen = few_labels(labelled.targets, cfg.labels_per_class, cfg.seed)
    teacher_arch = given_teacher(cfg, classes) if cfg.teacher else None
    arch = cfg.arch or (teacher_arch.name if teacher_arch else None)
    if arch is None:
        raise UserError("give --arch (trained on the labelled images in round 0) or --teacher CKPT")
    first = None if teacher_arch else make_arch(arch, cfg.width, classes, cfg.image_size, labelled)
    student_name = cfg.student_arch or arch
    width = cfg.student_width or cfg.width
    if width is None and teacher_arch and student_name == teacher_arch.name:
        width = teacher_arch.kwargs.get("width")
    student = make_arch(student_name, width, classes, cfg.image_size, labelled)
    teacher = teacher_arch or first
    student_size, teacher_size = student.parameters(), teacher.parameters()
    if student_size < teacher_size:
        raise UserError(f"the student ({student.name}, {student_size:,} parameters) is smaller than the "
                        f"teacher ({teacher.name}, {teacher_size:,}); Noisy Student needs a student at least "
                        "as large: pick a larger --student-arch or --student-width")
    inputs = [source_input(labelled), source_input(unlabelled), source_input(evaluation)]
    if cfg.teacher:
        inputs.append({"path": str(cfg.teacher), "fingerprint": load_checkpoint(cfg.teacher)["meta"]["fingerprint"]})
    return Prepared(cfg, labelled, unlabelled, evaluation, classes, chosen, eval_indices, first, student, inputs)


def given_teacher(cfg: SelfTrainConfig, classes: int) -> Arch:
    meta = load_checkpoint(cfg.teacher)["meta"]
    if "arch" not in meta:
        raise UserError(f"--teacher {cfg.teacher} does not record an arch; it is not a model checkpoint")
    predicts = meta.get("classes") or meta.get("arch_kwargs", {}).get("num_classes")
    if predicts != classes:
        raise UserError(f"--teacher {cfg.teacher} predicts {predicts} classes but --labelled has {classes}; give a "
                        "teacher trained on these classes (e.g. `ssl finetune --mode full` on the labelled data)")
    return Arch(meta["arch"], dict(meta.get("arch_kwargs", {})), int(meta["input_size"]))


def make_arch(name: str, width: float | None, classes: int, image_size: int | None, source: ImageSource) -> Arch:
    size = training_size(get_arch(name), source, image_size)
    return Arch(name, {"num_classes": classes, **({"width": width} if width is not None else {})}, size)


def round_config(cfg: SelfTrainConfig, r: int, arch: Arch) -> dict[str, Any]:
    """The settings a round's student (of `arch`) depends on: round 0 ignores the student and policy fields."""
    config = {key: value for key, value in cfg.result_config().items() if key != "rounds"}
    if r == 0:
        config = {key: value for key, value in config.items() if key not in cfg.POLICY | cfg.STUDENT_ONLY}
    return config | {"round": r, "arch_kwargs_resolved": arch.resolved()}


def provenance(cfg: SelfTrainConfig, prepared: Prepared | None = None) -> Provenance:
    """The whole run's provenance: summary.json records its fingerprint (what `ssl run` compares)."""
    prepared = prepared or prepare(cfg)
    return make_provenance("checkpoint", "self-train", cfg.recorded_config(), cfg.result_config() | prepared.resolved_archs(),
                           prepared.inputs)


def recorded_fingerprint(cfg: SelfTrainConfig) -> str | None:
    summary = cfg.out / "summary.json"
    return json.loads(summary.read_text()).get("fingerprint") if summary.exists() else None


@claim_scope()
def run(cfg: SelfTrainConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    if distributed.launched_world()[1] > 1:
        raise UserError("ssl self-train runs in one process (one GPU); start it without torchrun "
                        "(torchrun is for pretext, retrain and finetune)")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"--out {cfg.out} is a file; self-train writes a folder of rounds")
    prepared = prepare(cfg)
    whole = provenance(cfg, prepared)
    claim_output(cfg.out)  # one writer per folder (see artifacts.lock)
    if recorded_fingerprint(cfg) == whole.fingerprint and not cfg.force:
        reporter.info(f"{cfg.out} is up to date; skipped")
        return StageResult("self-train", cfg.out, "up to date", summary_of(cfg, read_json(cfg.out / "summary.json")))
    rounds = [round_zero(prepared, reporter)]
    teacher = cfg.teacher or prepared.round_dir(0) / "student.pt"
    for r in range(1, cfg.rounds + 1):
        reporter.info(f"round {r}/{cfg.rounds}: teacher {teacher}")
        rounds.append(self_training_round(prepared, r, teacher, rounds[-1], reporter))
        teacher = prepared.round_dir(r) / "student.pt"
    summary = {"fingerprint": whole.fingerprint, "classes": prepared.classes, "labelled_images": len(prepared.chosen),
               "unlabelled_images": len(prepared.unlabelled), "eval_images": len(prepared.eval_indices),
               "baseline": None if cfg.teacher else rounds[0]["student"]["top1"],
               "rounds": [row(metrics) for metrics in rounds], "config": cfg.recorded_config()}
    write_json(cfg.out / "summary.json", summary)
    return StageResult("self-train", cfg.out, "written", summary_of(cfg, summary))


def round_zero(prepared: Prepared, reporter: Reporter) -> dict[str, Any]:
    """The first teacher: --teacher evaluated as given, or --arch trained on the labelled images alone."""
    cfg = prepared.cfg
    folder = prepared.round_dir(0)
    if cfg.teacher:
        return evaluated(prepared, 0, cfg.teacher, {"role": "given teacher", "teacher": str(cfg.teacher)}, reporter)
    checkpoint = folder / "student.pt"
    provenance = make_provenance("checkpoint", "self-train", cfg.recorded_config(), round_config(cfg, 0, prepared.first),
                                 [source_input(prepared.labelled)])
    train_student(prepared, 0, prepared.first, None, checkpoint, provenance, reporter)
    return evaluated(prepared, 0, checkpoint, {"role": "labelled only"}, reporter)


def self_training_round(prepared: Prepared, r: int, teacher: Path, previous: dict[str, Any],
                        reporter: Reporter) -> dict[str, Any]:
    cfg = prepared.cfg
    folder = prepared.round_dir(r)
    folder.mkdir(parents=True, exist_ok=True)
    logits = teacher_logits(cfg, teacher, folder / "teacher-logits.h5", reporter)
    labels_path = write_labels(cfg, logits, folder / "labels.h5", prepared.classes, reporter)
    pseudo = read_pseudo_labels(labels_path, cfg.soft)
    checkpoint = folder / "student.pt"
    provenance = make_provenance("checkpoint", "self-train", cfg.recorded_config(), round_config(cfg, r, prepared.student),
                                 [source_input(prepared.labelled), {"path": str(labels_path), "fingerprint": pseudo.fingerprint}])
    train_student(prepared, r, prepared.student, pseudo, checkpoint, provenance, reporter)
    extra = {"role": "student", "teacher": str(teacher), "teacher_top1": previous["student"]["top1"],
             "pseudo_labels": label_stats(labels_path)}
    return evaluated(prepared, r, checkpoint, extra, reporter)


def train_student(prepared: Prepared, r: int, arch: Arch, pseudo, out: Path, provenance: Provenance,
                  reporter: Reporter) -> None:
    """Train a noised `arch` from scratch on the labelled images plus (r >= 1) the pseudo-labelled ones."""
    cfg = prepared.cfg
    seed = cfg.seed + r
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch.name, **arch.kwargs)
    noise = add_noise(model, cfg.dropout, cfg.stochastic_depth)
    randaugment = BatchRandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude)
    augment = batch_augment(cfg, arch.size, IMAGENET_MEAN, IMAGENET_STD)

    def augment_groups(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 1+r, 3, H, W) uint8 -> float of the same shape: RandAugment, then crops, shifts and flips,
        normalised, as one batch on the device (input noise; dropout and stochastic depth are the model's)."""
        return augment(randaugment(images.flatten(0, 1), generator), generator).view(images.shape)
    labels = prepared.labelled.targets[prepared.chosen].astype(np.int64)
    if pseudo is None:
        dataset = MixedDataset(prepared.labelled, prepared.chosen, labels, None, np.empty(0, np.int64),
                               np.empty((0, prepared.classes), np.float32), prepared.classes, 0, arch.size, seed)
    else:
        position = {sample_id: index for index, sample_id in enumerate(prepared.unlabelled.sample_ids)}
        rows = np.array([position.get(sample_id, -1) for sample_id in pseudo.sample_ids], dtype=np.int64)
        if (rows < 0).any():
            raise UserError(f"pseudo-labelled ids are not images of --unlabelled (e.g. {pseudo.sample_ids[rows < 0][0]}); "
                            "the unlabelled source changed since its labels were made: pass --force")
        dataset = MixedDataset(prepared.labelled, prepared.chosen, labels, prepared.unlabelled, rows, pseudo.targets,
                               prepared.classes, cfg.unlabelled_ratio, arch.size, seed)
    weight = cfg.unlabelled_weight

    def step(network: nn.Module, images: torch.Tensor, targets: torch.Tensor, context: StepContext | None = None):
        """images (B, 1+r, 3, H, W), targets (B, 1+r, C); column 0 is the labelled image of each group."""
        batch, group = images.shape[:2]
        logits = network(images.flatten(0, 1)).float().view(batch, group, -1)
        cross_entropy = -(targets * nn.functional.log_softmax(logits, dim=-1)).sum(-1)  # (B, 1+r)
        loss = cross_entropy[:, 0].mean()
        if group > 1:
            loss = loss + weight * cross_entropy[:, 1:].mean()
        accuracy = (logits[:, 0].argmax(1) == targets[:, 0].argmax(1)).float().mean().item()
        return loss, accuracy

    def final_payload(network: nn.Module) -> dict[str, Any]:
        spec = get_arch(arch.name)
        return {"meta": {"arch": arch.name, "arch_kwargs": arch.kwargs, "arch_kwargs_resolved": arch.resolved(),
                         "input_size": arch.size,
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "task": "self-train",
                         "round": r, "classes": prepared.classes, "class_names": list(prepared.labelled.classes),
                         "feature_layer": spec.feature_layer, "noise": noise},
                "model": network.state_dict()}

    train(model, dataset, step, replace(train_options(cfg, len(dataset)), seed=seed), out, provenance, final_payload,
          force=cfg.force, reporter=reporter, batch_transform=augment_groups)


def evaluated(prepared: Prepared, r: int, checkpoint: Path, extra: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """metrics.json of round r: the checkpoint's accuracy on --eval-data (skipped when up to date)."""
    cfg = prepared.cfg
    network = network_from_checkpoint(checkpoint)
    fingerprint = make_provenance("checkpoint", "self-train-eval", {}, {"eval": prepared.evaluation.fingerprint},
                                  network.inputs).fingerprint
    path = prepared.round_dir(r) / "metrics.json"
    if path.exists() and not cfg.force and read_json(path).get("fingerprint") == fingerprint:
        return read_json(path)
    device = resolve_device(cfg.device)
    logits = embed(network.model, prepared.evaluation, prepared.eval_indices, network, device, network.input_size,
                   cfg.eval_batch_size, cfg.workers)
    result = scores(prepared.evaluation.targets[prepared.eval_indices], logits.numpy(), prepared.classes)
    history = load_checkpoint(checkpoint)["meta"].get("history") or []
    metrics = {"fingerprint": fingerprint, "round": r, "checkpoint": str(checkpoint), **extra, "student": result,
               "labelled_images": len(prepared.chosen), "last_epoch": history[-1] if history else None}
    write_json(path, metrics)
    reporter.info(f"round {r}: top-1 {result['top1']:.4f} on {result['n']} evaluation images")
    return metrics


def row(metrics: dict[str, Any]) -> dict[str, Any]:
    pseudo = metrics.get("pseudo_labels") or {}
    return {"round": metrics["round"], "role": metrics["role"], "top1": metrics["student"]["top1"],
            "top5": metrics["student"]["top5"], "teacher_top1": metrics.get("teacher_top1"),
            "pseudo_labelled": pseudo.get("selected_rows"), "pseudo_accuracy": pseudo.get("accuracy"),
            "checkpoint": metrics["checkpoint"]}


def summary_of(cfg: SelfTrainConfig, summary: dict[str, Any]) -> dict[str, Any]:
    last = summary["rounds"][-1]
    return {"rounds": len(summary["rounds"]) - 1, "labelled images": summary["labelled_images"],
            "unlabelled images": summary["unlabelled_images"], "baseline top1": summary["baseline"],
            "final top1": last["top1"], "summary": str(cfg.out / "summary.json")}


def round_table(out: Path) -> list[dict[str, Any]]:
    """summary.json's rounds as table rows: accuracy next to the teacher's and the baseline's."""
    summary = read_json(out / "summary.json")
    return [{"round": item["round"], "model": item["role"], "top1": item["top1"], "teacher top1": item["teacher_top1"],
             "baseline top1": summary["baseline"], "pseudo-labelled": item["pseudo_labelled"],
             "pseudo-label acc": item["pseudo_accuracy"]} for item in summary["rounds"]]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)
