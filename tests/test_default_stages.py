"""The repository's own stages.yaml runs end to end on a CPU, and a second run skips every stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py

from ssl_cli.pipeline import run as pipeline

REPO = Path(__file__).resolve().parents[1]


def test_default_pipeline_runs_and_is_then_up_to_date(tmp_path):
    stages = tmp_path / "stages.yaml"
    shutil.copy(REPO / "stages.yaml", stages)
    results = pipeline.execute(stages)
    assert [r.stage for r in results] == ["toy-data", "pretext", "extract", "cluster", "cluster", "pseudolabel",
                                          "retrain", "toy-data", "finetune", "self-train"]
    assert {r.stage for r in results} >= {"pretext", "extract", "cluster", "pseudolabel", "retrain", "finetune",
                                          "self-train"}  # all seven stage commands
    with h5py.File(tmp_path / "runs/toy/labels.h5") as labels:
        assert json.loads(labels.attrs["metrics"])["nmi"] > 0.3  # measured 0.76; shuffled labels give ~0.01
    with h5py.File(tmp_path / "runs/toy/scan-clusters.h5") as clusters:
        assert clusters.attrs["method"] == "scan" and json.loads(clusters.attrs["metrics"])["nmi"] > 0.3
    assert (tmp_path / "runs/toy/student.pt").exists()
    report = json.loads((tmp_path / "runs/toy/finetune-linear/metrics.json").read_text())
    assert set(report["layers"]) == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    summary = json.loads((tmp_path / "runs/toy/self-train/summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1]
    teacher, student = (row["top1"] for row in summary["rounds"])
    assert teacher < 0.9 and student > teacher + 0.05  # the round shows what self-training does (0.66 -> 0.87)
    assert all((tmp_path / f"runs/toy/self-train/round-1/{name}").exists()
               for name in ("labels.h5", "student.pt", "metrics.json"))
    assert {row["action"] for row in pipeline.plan(stages)} == {"skip"}
