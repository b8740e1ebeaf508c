"""`ssl finetune` (knn, linear, full) and `ssl export` through the CLI, on toy images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from ssl_cli.artifacts.checkpoint import save_checkpoint
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.cli import app
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.models.registry import build_model

COMMON = ["--workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "16"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def checkpoint(path: Path, arch: str, **kwargs) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, **kwargs)
    meta = {"arch": arch, "arch_kwargs": kwargs, "input_size": 32}
    return save_checkpoint(path, make_provenance("checkpoint", "test", {}, {"arch": arch}, []),
                           {"meta": meta, "model": model.state_dict()})


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "toy"
    write_toy_folder(root, n=80, classes=4, size=32, seed=5)  # the same 4 classes, other images
    return root


@pytest.fixture(scope="module")
def random_alexnet(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("ckpt") / "alexnet.pt", "alexnet_lowres", num_classes=10, width=0.25)


def report(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_knn_on_features_that_separate_toy_classes_is_accurate(toy_dir, eval_dir, random_alexnet, tmp_path):
    out = tmp_path / "knn"
    result = cli("finetune", "--model", random_alexnet, "--data", toy_dir, "--eval-data", eval_dir, "--mode", "knn",
                 "--layers", "conv2", "--knn-k", "5", "--out", out, *COMMON)
    assert result.exit_code == 0, result.output
    scores = report(out)["layers"]["conv2"]
    assert scores["top1"] > 0.7  # measured 0.925-1.0 over 3 init seeds at random init; chance is 0.25
    assert set(scores["per_class"]) == {"0", "1", "2", "3"} and scores["n"] == 80
    again = cli("finetune", "--model", random_alexnet, "--data", toy_dir, "--eval-data", eval_dir, "--mode", "knn",
                "--layers", "conv2", "--knn-k", "5", "--out", out, *COMMON)
    assert again.exit_code == 0 and "up to date" in again.output


def test_linear_probes_every_layer_in_one_pass_and_beat_chance(toy_dir, eval_dir, random_alexnet, tmp_path):
    out = tmp_path / "linear"
    result = cli("finetune", "--model", random_alexnet, "--data", toy_dir, "--eval-data", eval_dir, "--mode", "linear",
                 "--layers", "conv1,conv2,conv5", "--epochs", "4", "--lr", "0.05", "--out", out, *COMMON)
    assert result.exit_code == 0, result.output
    layers = report(out)["layers"]
    assert set(layers) == {"conv1", "conv2", "conv5"}
    assert max(values["top1"] for values in layers.values()) > 0.6  # measured 0.99-1.0 (conv1), 3 seeds; chance 0.25
    assert (out / "linear.pt").exists()


def test_standardised_probes_read_the_small_activations_of_deep_layers(toy_dir, eval_dir, random_alexnet, tmp_path):
    """Without batch norm, alexnet_lowres' conv5 varies ~20x less across images than conv1: a raw linear
    probe trained for a few steps stays near chance there (the demo's conv4-5), a standardised one does not."""
    top1 = {}
    for flag in ("--linear-norm", "--no-linear-norm"):
        out = tmp_path / flag
        result = cli("finetune", "--model", random_alexnet, "--data", toy_dir, "--eval-data", eval_dir, "--mode",
                     "linear", "--layers", "conv5", "--epochs", "3", flag, "--out", out, *COMMON)
        assert result.exit_code == 0, result.output
        top1[flag] = report(out)["layers"]["conv5"]["top1"]
    assert top1["--linear-norm"] > 0.8 and top1["--linear-norm"] > top1["--no-linear-norm"] + 0.2, top1


def test_probe_statistics_average_every_batch_seen():
    """A probe trains for a few dozen steps: its running statistics are the plain average of the batches
    seen (an exponential average would still be mostly its initial variance of 1 after 24 steps)."""
    from ssl_cli.models.network import network_from_arch
    from ssl_cli.stages.finetune import LinearProbe

    network = network_from_arch("alexnet_lowres", None, 32, 0, {"width": 0.25})
    probe = LinearProbe(network, ["conv5"], classes=4, max_dims=9216).train()
    norm = probe.heads["conv5"][0]
    pooled = []
    norm.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0]))
    with torch.no_grad():
        for seed in (0, 1):
            probe(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    torch.testing.assert_close(norm.running_mean, (pooled[0].mean(0) + pooled[1].mean(0)) / 2)
    torch.testing.assert_close(norm.running_var, (pooled[0].var(0) + pooled[1].var(0)) / 2)


def test_full_finetuning_writes_a_checkpoint_with_a_fresh_classifier(toy_dir, eval_dir, random_alexnet, tmp_path):
    out = tmp_path / "full"
    result = cli("finetune", "--model", random_alexnet, "--data", toy_dir, "--eval-data", eval_dir, "--mode", "full",
                 "--freeze-through", "conv2", "--labels-per-class", "12", "--epochs", "2", "--out", out, *COMMON)
    assert result.exit_code == 0, result.output
    data = torch.load(out / "finetuned.pt", weights_only=True)
    assert data["model"]["classifier.6.weight"].shape[0] == 4
    source = torch.load(random_alexnet, weights_only=True)["model"]
    assert torch.equal(data["model"]["features.0.weight"], source["features.0.weight"])  # frozen through conv2
    assert torch.equal(data["model"]["features.3.weight"], source["features.3.weight"])
    assert not torch.equal(data["model"]["features.6.weight"], source["features.6.weight"])  # conv3 on trains
    assert report(out)["train_images"] == 48


@pytest.mark.parametrize("args, message", [
    (["--mode", "knn", "--labels-per-class", "500"], "exceeds class"),
    (["--mode", "knn", "--layers", "layer9"], "valid layers: conv1"),
    (["--mode", "linear"], "no test split"),
])
def test_bad_finetune_input(toy_dir, eval_dir, random_alexnet, tmp_path, args, message):
    extra = [] if message == "no test split" else ["--eval-data", eval_dir]
    result = cli("finetune", "--model", random_alexnet, "--data", toy_dir, *extra, *args, "--out", tmp_path / "o",
                 *COMMON)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_export_cli_loads_strictly_into_torchvision(tmp_path):
    source = checkpoint(tmp_path / "r18.pt", "resnet18", num_classes=7)
    result = cli("export", source, "--format", "torchvision", "--out", tmp_path / "r18-tv.pt")
    assert result.exit_code == 0, result.output
    model = torchvision.models.resnet18(weights=None, num_classes=7)
    model.load_state_dict(torch.load(tmp_path / "r18-tv.pt", weights_only=True), strict=True)
    refused = cli("export", source, "--format", "torchvision", "--out", tmp_path / "r18-tv.pt")
    assert refused.exit_code == 2 and "--force" in refused.output
