"""`ssl train`: an arch learns labelled images from scratch; batched augmentation; the recipe's defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ssl_cli.config import SupervisedConfig, resolve
from ssl_cli.data.batch_augment import BatchAugment, step_generator
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.errors import UserError
from ssl_cli.stages import train
from ssl_cli.train.recipe import default_epochs, default_shift
from ssl_cli.train.schedule import learning_rate

FAST = {"arch": "alexnet_bn_lowres", "width": 0.25, "batch_size": 16, "workers": 0, "device": "cpu",
        "progress": False}


@pytest.fixture(scope="module")
def toy_eval(tmp_path_factory):
    """Held-out toy images of the same 4 classes (another seed)."""
    root = tmp_path_factory.mktemp("eval") / "toy-eval"
    write_toy_folder(root, n=80, classes=4, size=32, seed=1)
    return root


def test_from_scratch_run_learns_and_writes_a_teacher_checkpoint(toy_dir, toy_eval, tmp_path, cli):
    out = tmp_path / "model.pt"
    result = cli("train", "--data", toy_dir, "--eval-data", toy_eval, "--arch", "alexnet_bn_lowres", "--width", "0.25",
                 "--epochs", "8", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("model.eval.json").read_text())
    # Measured: 1.0 for seeds 0, 1 and 2 after 8 epochs on 96 images; chance is 0.25.
    assert report["top1"] >= 0.7, report
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["task"] == "train" and meta["classes"] == 4 and meta["input_size"] == 32
    history = [json.loads(line) for line in out.with_name("model.metrics.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"]
    again = cli("train", "--data", toy_dir, "--eval-data", toy_eval, "--arch", "alexnet_bn_lowres", "--width", "0.25",
                "--epochs", "8", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--out", out)
    assert again.exit_code == 0 and "up to date" in again.output
    # the checkpoint is a teacher self-train takes as it is
    teacher = cli("self-train", "--labelled", toy_dir, "--unlabelled", toy_dir, "--eval-data", toy_eval, "--teacher",
                  out, "--rounds", "0", "--out", tmp_path / "st", "--workers", "0", "--device", "cpu")
    assert teacher.exit_code == 0, teacher.output
    assert json.loads((tmp_path / "st" / "summary.json").read_text())["rounds"][0]["top1"] == report["top1"]


def test_interrupted_train_resumes_to_identical_weights(toy_dir, tmp_path, monkeypatch):
    def config(out):
        return SupervisedConfig(data=str(toy_dir), eval_data=str(toy_dir), out=out, epochs=2, deterministic=True,
                                **FAST)

    reference = torch.load(train.run(config(tmp_path / "a.pt")).out, weights_only=True)["model"]
    from ssl_cli.train import loop

    real, calls = loop.distributed.any_rank, {"n": 0}

    def stop_at_step_4(flag, group, device):
        calls["n"] += 1
        return calls["n"] == 4 or real(flag, group, device)

    monkeypatch.setattr(loop.distributed, "any_rank", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.run(config(tmp_path / "b.pt"))
    monkeypatch.setattr(loop.distributed, "any_rank", real)
    assert (tmp_path / "b.pt.partial").exists()
    resumed = torch.load(train.run(config(tmp_path / "b.pt")).out, weights_only=True)["model"]
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


def test_bad_inputs_are_one_line_errors(toy_dir, tmp_path, cli):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in sorted(toy_dir.rglob("*.png"))[:4]:
        (flat / name.name).write_bytes(name.read_bytes())
    result = cli("train", "--data", flat, "--arch", "alexnet_bn_lowres", "--out", tmp_path / "m.pt")
    assert result.exit_code == 2 and "has no labels" in result.output
    result = cli("train", "--data", toy_dir, "--arch", "alexnet_bn_lowres", "--image-size", "8", "--out", tmp_path / "m.pt")
    assert result.exit_code == 2
    result = cli("train", "--data", toy_dir, "--arch", "alexnet_bn_lowres", "--image-size", "16",
                 "--labels-per-class", "1000", "--out", tmp_path / "m.pt")
    assert result.exit_code == 2 and "--labels-per-class 1000" in result.output
    # a folder has no test split: training still runs, the evaluation is simply not made
    assert train.evaluation_source(SupervisedConfig(data=str(toy_dir), out=tmp_path / "m.pt", **FAST)) is None
    # --eval-data none says so outright, even for a source with a test split; the command line accepts it
    cfg = resolve(SupervisedConfig, None, {"data": "fashion-mnist:/nowhere:train", "eval_data": "none",
                                          "out": tmp_path / "m.pt", **FAST})
    assert train.evaluation_source(cfg) is None
    with pytest.raises(UserError, match="--eval-data"):
        resolve(SupervisedConfig, None, {"data": str(toy_dir), "eval_data": "nowhere", "out": tmp_path / "m.pt",
                                         **FAST}, check_inputs=True)
    assert resolve(SupervisedConfig, None, {"data": str(toy_dir), "eval_data": "none", "out": tmp_path / "m.pt",
                                            **FAST}, check_inputs=True).eval_data == "none"
    with pytest.raises(UserError, match="--eval-data has class"):
        eight = tmp_path / "eight"
        write_toy_folder(eight, n=16, classes=8, size=32, seed=0)
        train.run(SupervisedConfig(data=str(toy_dir), eval_data=str(eight), out=tmp_path / "m.pt", epochs=1, **FAST))


def test_batched_augmentation_is_seeded_by_step_and_keeps_pixels_on_integer_shifts():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    augment = BatchAugment((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), min_scale=1.0, shift=2, flip=True)
    cpu = torch.device("cpu")
    a = augment(images, step_generator(0, 1, 5, cpu))
    b = augment(images, step_generator(0, 1, 5, cpu))
    c = augment(images, step_generator(0, 1, 6, cpu))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a shift by whole pixels (and a flip) moves pixels without blurring them: every output pixel is an
    # input pixel of the same image or black padding
    for out, image in zip(a, images.float() / 255):
        values = set(np.round(image.flatten().numpy(), 4)) | {0.0}
        assert set(np.round(out.flatten().numpy(), 4)) <= values
    assert torch.equal(BatchAugment((0.0,) * 3, (1.0,) * 3, flip=False)(images, None), images.float() / 255)


def test_recipe_defaults_scale_with_the_data():
    assert default_epochs(1000) == 60 and default_epochs(60_000) == 10 and default_epochs(50) == 100
    assert default_shift(28) == 2 and default_shift(32) == 2 and default_shift(224) == 16
    steps = [learning_rate(s, 100, 0, 1.0, "onecycle") for s in range(100)]
    assert steps[0] == pytest.approx(1 / 25) and max(steps) == pytest.approx(1.0, abs=1e-3)
    assert steps.index(max(steps)) == 30 and steps[-1] < 1e-3
