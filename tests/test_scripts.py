"""The GPU-box scripts run end to end on toy images on a CPU (sizes come from the environment), chain
into each other (the transfer's student initialises the self-training teacher), and a re-run skips
every finished stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ssl_cli.data.toy import write_toy_folder

REPO = Path(__file__).resolve().parents[1]

TOY_TRANSFER = {"DEEP_ARCH": "vgg16_lowres", "EXTRA_PRETEXT": "--width 0.125", "IMAGE_SIZE": "114",
                "SHALLOW_ARCH": "alexnet_lowres", "EXTRA_RETRAIN": "--width 0.25", "SHALLOW_SIZE": "32", "K": "4",
                "PCA_DIM": "16", "POOL_SIZE": "2", "PRETEXT_EPOCHS": "1", "RETRAIN_EPOCHS": "1",
                "FINETUNE_EPOCHS": "1", "LINEAR_EPOCHS": "1", "BATCH": "16", "WORKERS": "0", "LABELS_PER_CLASS": "8"}
TOY_SELF_TRAINING = {"ROUNDS": "1", "EPOCHS": "1", "INIT_EPOCHS": "1", "BATCH": "8", "WORKERS": "0", "THRESHOLD": "0",
                     "LABELS_PER_CLASS": "8", "LR": "0.01", "RATIO": "1"}


def script(name: str, env: dict[str, str], *args: object) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env, "SSL": f"{sys.executable} -m ssl_cli", "COLUMNS": "200"}
    return subprocess.run(["bash", str(REPO / "scripts" / name), *map(str, args)], env=environment,
                          capture_output=True, text=True, timeout=600)


def test_transfer_then_self_training_scripts_on_toy_images_and_rerun_skips(toy_dir, tmp_path):
    held_out = tmp_path / "eval"
    write_toy_folder(held_out, n=48, classes=4, size=32, seed=1)
    out = tmp_path / "transfer"
    data = ["--data", toy_dir, "--labelled", toy_dir, "--eval-data", held_out, "--out", out, "--gpus", 0]
    done = script("noroozi_transfer.sh", TOY_TRANSFER, *data)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("pretext.pt", "features.h5", "clusters.h5", "labels.h5", "student.pt", "linear/metrics.json",
                 "full/metrics.json", "full/finetuned.pt"):
        assert (out / name).exists(), name
    assert "linear conv5 top-1" in done.stdout and "full logits top-1" in done.stdout
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = script("noroozi_transfer.sh", TOY_TRANSFER, *data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date") >= 7  # every stage skipped
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    rounds = tmp_path / "self-training"
    done = script("self_training.sh", TOY_SELF_TRAINING, "--labelled", toy_dir, "--unlabelled", toy_dir,
                  "--eval-data", held_out, "--init", out / "student.pt", "--out", rounds, "--gpus", 0)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (rounds / "teacher/finetuned.pt").exists()
    assert all((rounds / "rounds/round-1" / name).exists() for name in ("labels.h5", "student.pt", "metrics.json"))


def test_scripts_refuse_missing_arguments_with_exit_2():
    for name in ("noroozi_transfer.sh", "self_training.sh"):
        done = script(name, {}, "--out", "/tmp/nowhere")
        assert done.returncode == 2 and "required" in done.stderr
