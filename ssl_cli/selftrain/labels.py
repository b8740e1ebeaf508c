"""A round's pseudo-labels: the teacher's logits on the unlabelled images (streamed and resumable,
through `ssl extract` of its `logits` layer, without augmentation), then the policy, in labels.h5.

labels.h5 holds one row per unlabelled image the teacher saw: `sample_ids`, `labels` (hard),
`confidence` (top probability at T=1), `targets` (the source's own labels, -1 if none; used only
to report pseudo-label accuracy), `probs` (softmax(logits / T), with --soft), and `selected`:
the rows the student learns, repeats included (the policy's output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_cli.artifacts.h5 import H5Artifact, write_arrays
from ssl_cli.artifacts.outputs import plan_output
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.config import ExtractConfig, SelfTrainConfig
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter
from ssl_cli.selftrain.policy import probabilities, select
from ssl_cli.stages import extract


@dataclass(frozen=True)
class PseudoLabels:
    """sample_ids (M,) of the selected unlabelled images (repeats allowed) and targets (M, C) float32."""

    sample_ids: np.ndarray
    targets: np.ndarray
    fingerprint: str


def teacher_logits(cfg: SelfTrainConfig, teacher: Path, out: Path, reporter: Reporter) -> Path:
    """(N, C) logits of `teacher` on --unlabelled in `out` (the extract stage: resumable, skips when up to date)."""
    extract.run(ExtractConfig(data=cfg.unlabelled, model=teacher, layer="logits", pool="none", out=out,
                              batch_size=cfg.eval_batch_size, workers=cfg.workers, device=cfg.device,
                              progress=cfg.progress, force=cfg.force), reporter)
    return out


def write_labels(cfg: SelfTrainConfig, logits_path: Path, out: Path, classes: int, reporter: Reporter) -> Path:
    """Apply the policy to the logits in `logits_path`; write labels.h5 unless it is up to date."""
    with H5Artifact(logits_path, "features", required=("features", "sample_ids")) as stored:
        record = {"path": str(logits_path), "fingerprint": stored.fingerprint}
        policy = {field: getattr(cfg, field) for field in sorted(cfg.POLICY)}
        provenance = make_provenance("labels", "self-train", policy, policy, [record])
        plan = plan_output(out, provenance.fingerprint, cfg.force)
        if plan.up_to_date:
            reporter.info(f"{out} is up to date; skipped")
            return out
        logits = stored.array("features").astype(np.float32)
        ids = np.array(stored.strings("sample_ids"), dtype=object)
        targets = stored.array("targets") if "targets" in stored else np.full(len(ids), -1, dtype=np.int64)
    if logits.shape[1] != classes:
        raise UserError(f"the teacher predicts {logits.shape[1]} classes but the labelled data has {classes}")
    confident = probabilities(logits)
    selection = select(confident, cfg.threshold, cfg.balance)
    if not len(selection.indices):
        raise UserError(f"no unlabelled image reached --threshold {cfg.threshold} (the teacher's most confident "
                        f"prediction is {confident.max():.3f}); lower --threshold")
    arrays = {"sample_ids": ids, "labels": confident.argmax(axis=1).astype(np.int64), "confidence": confident.max(axis=1),
              "targets": targets, "selected": selection.indices}
    if cfg.soft:
        arrays["probs"] = probabilities(logits, cfg.temperature)
    known = targets[selection.indices] >= 0
    accuracy = float((selection.hard[known] == targets[selection.indices][known]).mean()) if known.any() else None
    metrics = {"unlabelled": len(ids), "selected_rows": len(selection.indices),
               "distinct_selected": len(np.unique(selection.indices)),
               "per_class": np.bincount(selection.hard, minlength=classes).tolist(),
               "mean_confidence": float(selection.confidence.mean()), "accuracy": accuracy}
    write_arrays(out, provenance, arrays, attrs={"k": classes, "metrics": metrics})
    return out


def read_pseudo_labels(path: Path, soft: bool) -> PseudoLabels:
    """The selected rows of labels.h5 as (ids, target distributions): one-hot, or the stored probs."""
    required = ("sample_ids", "labels", "selected") + (("probs",) if soft else ())
    with H5Artifact(path, "labels", required=required) as stored:
        selected = stored.array("selected")
        ids = np.array(stored.strings("sample_ids"), dtype=object)[selected]
        classes = int(stored.attrs["k"])
        if soft:
            targets = stored.array("probs")[selected].astype(np.float32)
        else:
            targets = np.eye(classes, dtype=np.float32)[stored.array("labels")[selected]]
        return PseudoLabels(ids, targets, stored.fingerprint)


def label_stats(path: Path) -> dict:
    """What the policy kept, for metrics.json: counts, mean confidence, accuracy against known targets."""
    with H5Artifact(path, "labels") as stored:
        return dict(stored.attrs["metrics"])
