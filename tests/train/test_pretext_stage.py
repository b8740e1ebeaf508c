"""`ssl pretext` end to end: CLI, checkpoint contents, SIGKILL + resume, torchrun with 2 gloo ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from ssl_cli.cli import app
from ports import free_port

ROTATION = ["pretext", "--task", "rotation", "--arch", "alexnet_lowres", "--width", "0.25", "--image-size", "32",
            "--batch-size", "16", "--lr", "0.005", "--workers", "0", "--device", "cpu", "--no-progress",
            "--deterministic", "--seed", "0"]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_pretext_checkpoint_feeds_extract_with_no_other_flag(toy_dir, tmp_path):
    out = tmp_path / "pretext.pt"
    result = cli(*ROTATION, "--data", str(toy_dir), "--epochs", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = torch.load(out, weights_only=True)
    meta = data["meta"]
    assert meta["schema"] == "ssl-cli/checkpoint@1.0"
    assert (meta["arch"], meta["task"], meta["input_size"]) == ("alexnet_lowres", "rotation", 32)
    assert meta["arch_kwargs"] == {"width": 0.25} and len(meta["history"]) == 2
    assert (tmp_path / "pretext.metrics.jsonl").read_text().count("\n") == 2
    features = tmp_path / "features.h5"
    result = cli("extract", "--model", str(out), "--data", str(toy_dir), "--out", str(features), "--workers", "0",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert "pool5" in result.output  # the checkpoint's feature layer is the default
    again = cli(*ROTATION, "--data", str(toy_dir), "--epochs", "2", "--out", str(out))
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "valid tasks by family: handcrafted: jigsaw, jigsawpp, rotation, context, colorization, "
                         "inpainting; contrastive: simclr, simclr2, moco, moco2, pirl; clustering: deepcluster, sela, swav; "
                             "reconstructive: autoencoder"),
    (["--arch", "nope"], "valid archs"),
    (["--lr", "-1"], "--lr"),
    (["--task-option", "novalue"], "KEY=VALUE"),
])
def test_bad_pretext_input_is_one_line_exit_2(toy_dir, tmp_path, args, message):
    base = dict(zip(ROTATION[1::2], ROTATION[2::2]))
    argv = ["pretext"]
    overridden = {args[i] for i in range(0, len(args), 2)}
    for key in ("--task", "--arch", "--image-size", "--batch-size", "--lr", "--workers", "--device", "--seed"):
        if key not in overridden:
            argv += [key, base[key]]
    result = cli(*argv, *args, "--data", str(toy_dir), "--epochs", "1", "--out", str(tmp_path / "x.pt"))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.pt").exists()


def _run(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ssl_cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kwargs)


def test_sigkill_then_resume_gives_identical_weights(toy_dir, tmp_path, killed_then_resumed):
    out = tmp_path / "b.pt"
    reference = killed_then_resumed([*ROTATION, "--data", str(toy_dir), "--epochs", "5"], out, epochs=5, timeout=240)
    want = torch.load(reference, weights_only=True)["model"]
    got = torch.load(out, weights_only=True)["model"]
    assert all(torch.equal(want[key], got[key]) for key in want)


def test_sigkill_mid_epoch_resumes_from_the_timed_checkpoint_to_identical_weights(toy_dir, tmp_path):
    """One epoch only: with --checkpoint-minutes tiny the partial is written inside the epoch, so a kill -9 loses
    only the steps since it (an ImageNet epoch is hours); the re-run resumes at that step, same weights."""
    import signal
    import time

    args = [*ROTATION, "--data", str(toy_dir), "--epochs", "1", "--checkpoint-minutes", "0.0001"]
    reference = tmp_path / "reference.pt"
    assert _run([*args, "--out", str(reference)]).wait(timeout=240) == 0
    out = tmp_path / "k.pt"
    partial = out.with_name(out.name + ".partial")
    process = _run([*args, "--out", str(out)])
    deadline = time.time() + 240
    while not partial.exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial.exists() and not out.exists()
    saved = torch.load(partial, weights_only=True)
    assert saved["epoch"] == 0 and saved["step"] >= 1  # inside the only epoch
    resumed = _run([*args, "--out", str(out)])
    output = resumed.communicate(timeout=240)[0].decode()
    assert resumed.returncode == 0 and "resuming" in output, output
    want, got = (torch.load(path, weights_only=True)["model"] for path in (reference, out))
    assert all(torch.equal(want[key], got[key]) for key in want)


def test_torchrun_two_gloo_ranks_write_one_checkpoint(toy_dir, tmp_path):
    out = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "ssl_cli", *ROTATION, "--data", str(toy_dir), "--epochs", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.exists() and not out.with_name("ddp.pt.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.metrics.jsonl", "ddp.pt"]
    history = torch.load(out, weights_only=True)["meta"]["history"]
    assert len(history) == 2 and history[0]["images_per_second"] > 0
