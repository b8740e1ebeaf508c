"""The contrastive and reconstructive tasks end to end: one epoch from the CLI whose checkpoint feeds
`ssl extract --model` alone, an exact resume of a killed moco2 run (weights, queue, key encoder),
two gloo ranks, the kNN monitor, SimCLRv2's proj1 layer, and the view recipe chosen for grey images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from ssl_cli.cli import app
from ssl_cli.data.resized import is_grey
from ssl_cli.models.network import network_from_checkpoint
from ssl_cli.pretext.registry import FAMILIES
from ports import free_port

COMMON = ["--arch", "alexnet_bn_lowres", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--no-progress",
          "--seed", "0"]
NEW_TASKS = [*FAMILIES["contrastive"], *FAMILIES["reconstructive"]]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("task", NEW_TASKS)
def test_task_trains_an_epoch_and_feeds_extract_with_no_other_flag(task, toy_dir, tmp_path):
    out = tmp_path / f"{task}.pt"
    result = cli("pretext", "--task", task, *COMMON, "--data", str(toy_dir), "--epochs", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["task"] == task and meta["input_size"] == 32
    assert meta["task_family"] == ("reconstructive" if task == "autoencoder" else "contrastive")
    assert len(meta["history"]) == 1 and meta["history"][0]["loss"] > 0
    features = tmp_path / "features.h5"
    result = cli("extract", "--model", str(out), "--data", str(toy_dir), "--out", str(features), "--workers", "0",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    # the trunk's pooled map, as for every pretext checkpoint; SimCLRv2's is the head's first block
    assert ("proj1" if task == "simclr2" else "pool5") in result.output


def test_moco2_state_is_in_the_checkpoint(toy_dir, tmp_path):
    out = tmp_path / "moco2.pt"
    args = [arg if arg != "16" else "20" for arg in COMMON]  # batches of 20: 4 steps, 80 keys
    result = cli("pretext", "--task", "moco2", *args, "--data", str(toy_dir), "--epochs", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = torch.load(out, weights_only=True)
    head = data["head"]
    assert head["queue.queue"].shape == (96, 128)  # the papers' 65,536 capped at the 96 toy images
    assert int(head["queue.pointer"]) == 80
    norms = head["queue.queue"].norm(dim=1)  # keys are stored unnormalised; the initial rows are unit vectors
    assert not torch.allclose(norms[:80], torch.ones(80)) and torch.allclose(norms[80:], torch.ones(16))
    assert any(key.startswith("key_backbone.") for key in head)
    assert data["meta"]["queue_length"] == 96
    # the key encoder moved towards the query encoder but is not a copy of it
    name = "features.0.weight"
    assert not torch.equal(head[f"key_backbone.{name}"], data["model"][name])


def test_killed_moco2_run_resumes_to_the_same_weights_and_queue(toy_dir, tmp_path, killed_then_resumed):
    args = ["pretext", "--task", "moco2", *COMMON, "--deterministic", "--data", str(toy_dir), "--epochs", "4"]
    out = tmp_path / "b.pt"
    reference = killed_then_resumed(args, out, epochs=4)
    want, got = torch.load(reference, weights_only=True), torch.load(out, weights_only=True)
    for part in ("model", "head"):  # head: projection, key encoder, queue and its pointer
        assert want[part].keys() == got[part].keys()
        assert all(torch.equal(want[part][key], got[part][key]) for key in want[part]), part


@pytest.mark.parametrize("task", ["simclr", "moco2"])
def test_two_gloo_ranks_train_one_checkpoint(task, toy_dir, tmp_path):
    """simclr gathers every rank's views as negatives; moco2 shuffles keys across ranks and gathers them."""
    out = tmp_path / "ddp.pt"
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "ssl_cli", "pretext", "--task", task, *COMMON, "--data", str(toy_dir), "--epochs", "1",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    data = torch.load(out, weights_only=True)
    assert len(data["meta"]["history"]) == 1
    if task == "moco2":  # 3 steps of 16 images a rank; both ranks' keys enqueued: all 96 rows written once
        queue = data["head"]["queue.queue"]
        assert int(data["head"]["queue.pointer"]) == 0
        assert not torch.isclose(queue.norm(dim=1), torch.ones(96)).any()


def test_monitor_writes_knn_top1_to_the_metrics(toy_dir, tmp_path):
    out = tmp_path / "simclr.pt"
    result = cli("pretext", "--task", "simclr", *COMMON, "--data", str(toy_dir), "--epochs", "2", "--out", str(out),
                 "--monitor-data", str(toy_dir), "--monitor-every", "2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "simclr.metrics.jsonl").read_text().splitlines()]
    assert "knn_top1" not in rows[0]  # measured every 2 epochs
    assert 0.25 < rows[1]["knn_top1"] <= 1.0  # 4 toy classes: features of a trained trunk sort them


def test_simclr2_proj1_is_a_layer_for_extract_and_finetune(toy_dir, tmp_path):
    out = tmp_path / "simclr2.pt"
    result = cli("pretext", "--task", "simclr2", *COMMON, "--data", str(toy_dir), "--epochs", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    network = network_from_checkpoint(out)
    assert "proj1" in network.spec.layers and network.projection == {"d_in": 64, "width": 64, "head_prefix": "projection.layers.0."}
    # the block read by `ssl_cli.models.projected` is the trained head's first block
    head = torch.load(out, weights_only=True)["head"]
    assert torch.equal(network.model.proj1[0].weight, head["projection.layers.0.0.weight"])
    features = tmp_path / "proj1.h5"
    result = cli("extract", "--model", str(out), "--data", str(toy_dir), "--out", str(features), "--workers", "0",
                 "--no-progress")  # proj1 is the checkpoint's feature layer: no --layer needed
    assert result.exit_code == 0 and "proj1" in result.output, result.output
    tuned = tmp_path / "tuned"
    result = cli("finetune", "--model", str(out), "--data", str(toy_dir), "--eval-data", str(toy_dir), "--mode", "full",
                 "--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--no-progress",
                 "--out", str(tuned))
    assert result.exit_code == 0, result.output
    teacher = network_from_checkpoint(tuned / "finetuned.pt")  # what `ssl self-train --teacher` loads
    assert not any(p.requires_grad for p in teacher.model.backbone.classifier.parameters())  # unused: DDP-safe
    assert {"proj1", "logits"} <= set(teacher.spec.layers)
    with torch.no_grad():
        assert teacher.model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_views_auto_picks_the_grey_recipe_for_grey_images():
    colour = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert not is_grey(colour)
    assert is_grey(colour[:, :1].expand(-1, 3, -1, -1))


def test_bad_task_option_is_one_line_exit_2(toy_dir, tmp_path):
    for option, message in [("temperature=-1", "temperature"), ("views=nope", "valid presets"),
                            ("nosuch=1", "view options")]:
        result = cli("pretext", "--task", "simclr", *COMMON, "--data", str(toy_dir), "--out", str(tmp_path / "x.pt"),
                     "--task-option", option)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
