"""The clustering tasks (deepcluster, sela, swav) end to end: an epoch from the CLI whose checkpoint feeds
`ssl extract --model` alone, DeepCluster interrupted mid-epoch resuming to the same weights and labels
without clustering again, its empty-cluster rule and uniform sampling, SeLa's equal parts, SwAV's frozen
and normalised prototypes, the Sobel input, and the bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssl_cli.cli import app
from ssl_cli.config import PretextConfig
from ssl_cli.data.batch_augment import sobel
from ssl_cli.models.registry import build_model
from ssl_cli.pretext.base import PretextNetwork
from ssl_cli.pretext.clustering.deepcluster import DeepClusterTask, fill_empty_clusters
from ssl_cli.pretext.registry import FAMILIES
from ssl_cli.stages import pretext as pretext_stage
from ports import free_port

COMMON = ["--arch", "alexnet_bn_lowres", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--no-progress",
          "--seed", "0"]
SMALL = {"deepcluster": ["k=8"], "sela": ["k=8", "heads=2"], "swav": ["prototypes=20", "small=2"]}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def options(task: str) -> list[str]:
    return [arg for option in SMALL[task] for arg in ("--task-option", option)]


def test_the_family_lists_the_three_methods(toy_dir, tmp_path):
    assert set(FAMILIES["clustering"]) == {"deepcluster", "sela", "swav"}
    result = cli("pretext", "--task", "nosuch", "--arch", "alexnet_bn_lowres", "--data", str(toy_dir), "--out",
                 str(tmp_path / "x.pt"))
    assert result.exit_code == 2 and "clustering: deepcluster, sela, swav" in result.output


@pytest.mark.parametrize("task", ["deepcluster", "sela", "swav"])
def test_task_trains_and_feeds_extract_with_no_other_flag(task, toy_dir, tmp_path):
    out = tmp_path / f"{task}.pt"
    result = cli("pretext", "--task", task, *options(task), *COMMON, "--data", str(toy_dir), "--epochs", "2",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    data = torch.load(out, weights_only=True)
    meta, head = data["meta"], data["head"]
    assert meta["task"] == task and meta["task_family"] == "clustering"
    history = meta["history"]
    assert len(history) == 2 and all(row["loss"] > 0 for row in history)
    if task == "deepcluster":
        assert head["labels"].shape == (96,) and head["labels"].max() < 8 and int(head["labelled_epoch"]) == 1
        assert "nmi_previous" in history[1] and 0 <= history[1]["nmi_previous"] <= 1
    if task == "sela":
        assert head["labels"].shape == (2, 96)
        # the argmax of an equipartition (exact marginals: tests/pretext/losses/test_sinkhorn.py) uses every part
        sizes = torch.bincount(head["labels"][0], minlength=8)
        assert (sizes > 0).all() and sizes.max() < 3 * 12
        assert "label_change" in history[1]
    if task == "swav":
        norms = head["prototypes.weight"].norm(dim=1)
        assert torch.allclose(norms, torch.ones(20), atol=1e-5)
    features = tmp_path / "features.h5"
    result = cli("extract", "--model", str(out), "--data", str(toy_dir), "--out", str(features), "--workers", "0",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert "pool5" in result.output


def config(data, out, **overrides) -> PretextConfig:
    values = dict(task="deepcluster", arch="alexnet_bn_lowres", data=str(data), out=out, epochs=3, batch_size=16,
                  workers=0, device="cpu", progress=False, seed=0, deterministic=True, task_options={"k": 8})
    values.update(overrides)
    return PretextConfig(**values)


def test_deepcluster_interrupted_mid_epoch_resumes_with_the_same_labels(toy_dir, tmp_path, monkeypatch):
    """96 images in batches of 16: 6 steps an epoch; the stop lands at step 3 of epoch 2."""
    relabels = {"n": 0}
    real_relabel = DeepClusterTask.relabel

    def counted(self, *args):
        relabels["n"] += 1
        return real_relabel(self, *args)

    monkeypatch.setattr(DeepClusterTask, "relabel", counted)
    pretext_stage.run(config(toy_dir, tmp_path / "a.pt"))
    assert relabels["n"] == 3
    import ssl_cli.train.loop as loop

    calls = {"n": 0}
    real = loop.distributed.any_rank

    def stop_after(flag, group, device):
        calls["n"] += 1
        return real(flag or calls["n"] == 9, group, device)

    monkeypatch.setattr(loop.distributed, "any_rank", stop_after)
    with pytest.raises(KeyboardInterrupt):
        pretext_stage.run(config(toy_dir, tmp_path / "b.pt"))
    monkeypatch.setattr(loop.distributed, "any_rank", real)
    partial = torch.load(tmp_path / "b.pt.partial", weights_only=True)
    assert (partial["epoch"], partial["step"]) == (1, 3)
    relabels["n"] = 0
    result = pretext_stage.run(config(toy_dir, tmp_path / "b.pt"))
    assert result.status == "resumed"
    assert relabels["n"] == 1  # epoch 3 only: epoch 2's labels came back from the checkpoint
    want, got = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    for part in ("model", "head"):  # weights, labels, previous labels, NMI; not the wall time of a labelling
        differ = [key for key in want[part] if key != "label_seconds" and not torch.equal(want[part][key], got[part][key])]
        assert not differ, (part, differ)
    assert [row["loss"] for row in got["meta"]["history"]] == pytest.approx(
        [row["loss"] for row in want["meta"]["history"]])


def test_empty_clusters_take_half_of_a_populated_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    centroids = rng.standard_normal((4, 5)).astype(np.float32)
    labels = np.array([0] * 30 + [1] * 10)  # clusters 2 and 3 empty
    filled, count = fill_empty_clusters(x, centroids, labels, np.random.default_rng(1))
    sizes = np.bincount(filled, minlength=4)
    assert count == 2 and (sizes > 0).all() and sizes.sum() == 40
    assert set(np.flatnonzero(filled != labels)) <= set(range(40))
    # every moved image left a cluster that still has members
    assert (np.bincount(filled[labels == 0], minlength=4)[[0]] > 0).all()


def test_uniform_sampling_weighs_every_cluster_the_same():
    task = DeepClusterTask(32, k=3)
    task.size_of_dataset = 6
    head = task.build_head((8, 1, 1))
    head.labels.copy_(torch.tensor([0, 0, 0, 0, 1, 2]))
    weights = task.sample_weights(head)
    per_cluster = [float(weights[head.labels == c].sum()) for c in range(3)]
    assert per_cluster == pytest.approx([1.0, 1.0, 1.0])


def test_swav_prototypes_do_not_move_while_frozen(toy_dir, tmp_path):
    out = tmp_path / "swav.pt"
    result = cli("pretext", "--task", "swav", *options("swav"), *COMMON, "--data", str(toy_dir), "--epochs", "1",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    trained = torch.load(out, weights_only=True)["head"]["prototypes.weight"]
    # the prototypes the stage starts from: the same seed, arch and task
    task = pretext_stage.make_task(config(toy_dir, out, task="swav", task_options={"prototypes": 20, "small": 2}),
                                   pretext_stage.open_source(str(toy_dir)))
    task.dataset(pretext_stage.open_source(str(toy_dir)), 0)
    torch.manual_seed(0)
    initial = PretextNetwork(build_model("alexnet_bn_lowres"), task).head.prototypes.weight
    assert torch.allclose(trained, initial, atol=1e-5)


def test_deepcluster_with_sobel_input_records_it_for_extract(toy_dir, tmp_path):
    out = tmp_path / "sobel.pt"
    result = cli("pretext", "--task", "deepcluster", "--task-option", "k=4", "--task-option", "sobel=true", *COMMON,
                 "--data", str(toy_dir), "--epochs", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["meta"]["input_mode"] == "sobel"
    result = cli("extract", "--model", str(out), "--data", str(toy_dir), "--out", str(tmp_path / "f.h5"),
                 "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output


def test_sobel_of_a_flat_image_is_zero_and_of_a_vertical_edge_is_horizontal():
    flat = torch.full((1, 3, 8, 8), 0.5)
    assert torch.equal(sobel(flat), torch.zeros(1, 3, 8, 8))
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 4:] = 1.0
    response = sobel(edge)
    assert response[0, 0].abs().sum() > 0 and response[0, 1].abs().sum() == 0


@pytest.mark.parametrize("task, option, message", [
    ("deepcluster", "k=500", "k=500 clusters need at least as many images"),
    ("sela", "k=500", "k=500 equal parts need at least as many images"),
    ("deepcluster", "backend=nope", "backend must be one of"),
    ("swav", "small_min_scale=0.5", "small_max_scale must be"),
    ("sela", "heads=0", "heads must be an integer"),
])
def test_bad_options_exit_2_with_one_line(task, option, message, toy_dir, tmp_path):
    result = cli("pretext", "--task", task, "--task-option", option, *COMMON, "--data", str(toy_dir), "--epochs", "1",
                 "--out", str(tmp_path / "x.pt"))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x.pt").exists()
    assert len(result.output.strip().splitlines()) == 1


def test_metrics_file_carries_the_labelling_figures(toy_dir, tmp_path):
    out = tmp_path / "dc.pt"
    pretext_stage.run(config(toy_dir, out, epochs=2, deterministic=False))
    rows = [json.loads(line) for line in (tmp_path / "dc.metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in row if k in ("empty_filled", "label_seconds", "nmi_previous")) for row in rows] == \
        [["empty_filled", "label_seconds"], ["empty_filled", "label_seconds", "nmi_previous"]]


@pytest.mark.parametrize("task, extra", [
    ("swav", ["--task-option", "queue_length=32", "--task-option", "queue_start=1"]),
    ("deepcluster", []),
])
def test_two_gloo_ranks_train_one_checkpoint(task, extra, toy_dir, tmp_path):
    """swav: the Sinkhorn sums over both ranks and the queue takes both ranks' batches; deepcluster: each rank
    embeds its half of the set, both get the same labels (tests/pretext/test_clustering_ranks.py checks them
    against one process) and sample their own share."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp.pt"
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "ssl_cli", "pretext", "--task", task, *options(task), *extra, *COMMON, "--data", str(toy_dir),
               "--epochs", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    data = torch.load(out, weights_only=True)
    assert len(data["meta"]["history"]) == 2
    if task == "swav":  # 3 steps of 16 a rank and epoch, 32 rows gathered a step: the queue is full
        assert int(data["head"]["queue_filled"]) == 32 and data["head"]["queue"].abs().sum() > 0
    else:
        assert data["head"]["labels"].shape == (96,) and int(data["head"]["labelled_epoch"]) == 1
