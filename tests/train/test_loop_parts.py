"""The training loop's pure parts, and kill/resume of the loop itself on a tiny task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rows import InMemoryRows, classification_step
from torch import nn

from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.errors import UserError
from ssl_cli.train.loop import TrainOptions, metrics_path, train
from ssl_cli.train.sampler import EpochSampler
from ssl_cli.train.schedule import learning_rate


def test_warmup_then_cosine_to_zero():
    rates = [learning_rate(step, 100, 10, 0.1, "cosine") for step in range(100)]
    assert rates[0] == pytest.approx(0.01)
    assert rates[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] < 0.001
    assert learning_rate(50, 100, 0, 0.1, "constant") == 0.1


def test_sampler_shards_cover_everything_once_and_resume_skips_a_prefix():
    shards = [EpochSampler(10, seed=3, epoch=1, rank=r, world=2).order().tolist() for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    assert list(EpochSampler(10, 3, 1, 0, 2, start=2)) == shards[0][2:]
    assert EpochSampler(10, 3, 1).order().tolist() != EpochSampler(10, 3, 2).order().tolist()
    assert EpochSampler(10, 3, 1).order().tolist() == EpochSampler(10, 3, 1).order().tolist()


def test_uniform_weights_balance_classes():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = 1.0 / torch.bincount(labels)[labels].double()
    drawn = labels[EpochSampler(100, 0, 0, weights=weights).order()]
    assert abs(drawn.float().mean().item() - 0.5) < 0.15


class Blobs(InMemoryRows):
    """Two gaussian blobs; (inputs, target, index, ok) like every training dataset."""

    def __init__(self, n: int = 64):
        rng = np.random.default_rng(0)
        self.y = rng.integers(0, 2, n)
        self.x = torch.from_numpy((rng.normal(size=(n, 8)) + 2.0 * self.y[:, None]).astype(np.float32))
        self.y = torch.from_numpy(self.y).long()


step = classification_step


def run(out: Path, epochs: int = 4, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    provenance = make_provenance("checkpoint", "test", {}, {"epochs": epochs}, [])
    options = TrainOptions(epochs=epochs, batch_size=8, lr=0.1, seed=0, deterministic=True, workers=0, **kwargs)
    return train(model, Blobs(), step, options, out, provenance, lambda m: {"model": m.state_dict()})


def test_loss_falls_and_metrics_are_written(tmp_path):
    result = run(tmp_path / "m.pt")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["accuracy"] > 0.8
    lines = metrics_path(tmp_path / "m.pt").read_text().splitlines()
    assert len(lines) == 4
    data = torch.load(tmp_path / "m.pt", weights_only=True)
    assert data["meta"]["schema"] == "ssl-cli/checkpoint@1.0"
    assert not (tmp_path / "m.pt.partial").exists()
    assert run(tmp_path / "m.pt").status == "up to date"


@pytest.mark.parametrize("stop_at", [5, 8])  # mid-epoch; after the epoch's last step (8 steps an epoch)
def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch, stop_at):
    reference = torch.load(run(tmp_path / "a.pt").out, weights_only=True)["model"]
    interrupt_after(monkeypatch, stop_at)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt")
    monkeypatch.undo()  # the real any_rank again
    assert (tmp_path / "b.pt.partial").exists() and not (tmp_path / "b.pt").exists()
    partial = torch.load(tmp_path / "b.pt.partial", weights_only=True)
    assert (partial["epoch"], partial["step"]) == (0, stop_at)
    resumed = run(tmp_path / "b.pt")
    assert resumed.status == "resumed"
    weights = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    assert all(torch.equal(reference[key], weights[key]) for key in reference)
    first = [row["loss"] for row in torch.load(tmp_path / "a.pt", weights_only=True)["meta"]["history"]]
    assert [row["loss"] for row in resumed.history] == pytest.approx(first)


def test_batch_larger_than_data_is_a_user_error(tmp_path):
    provenance = make_provenance("checkpoint", "test", {}, {}, [])
    with pytest.raises(UserError, match="lower --batch-size"):
        train(nn.Linear(8, 2), Blobs(4), step, TrainOptions(epochs=1, batch_size=8, lr=0.1, workers=0),
              tmp_path / "x.pt", provenance, lambda m: {"model": m.state_dict()})


class ImageBlobs(Blobs):
    """The blobs as (2, 4, 4) images, so that the loop's memory format and precision reach a convolution."""

    def __getitem__(self, index):
        x = torch.from_numpy(np.tile(self.x[index], 4)).view(2, 4, 4)
        return x, torch.tensor(int(self.y[index])), index, True


def run_conv(out: Path, epochs: int = 2, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    provenance = make_provenance("checkpoint", "test", {}, {"epochs": epochs}, [])
    options = TrainOptions(epochs=epochs, batch_size=8, lr=0.1, seed=0, deterministic=True, workers=0, device="cpu",
                           **kwargs)
    return train(model, ImageBlobs(), step, options, out, provenance, lambda m: {"model": m.state_dict()})


def interrupt_after(monkeypatch, steps: int) -> None:
    """The loop saves `.partial` and stops after `steps` steps, as SIGINT would."""
    import ssl_cli.train.loop as loop

    calls = {"n": 0}
    real = loop.distributed.any_rank

    def stop_after(flag, group, device):
        calls["n"] += 1
        return real(flag or calls["n"] == steps, group, device)

    monkeypatch.setattr(loop.distributed, "any_rank", stop_after)


@pytest.mark.parametrize("layout", [{"channels_last": True, "bf16": False}, {"channels_last": True, "bf16": True},
                                    {"channels_last": False, "bf16": False}])
def test_channels_last_and_bf16_on_cpu_resume_to_identical_weights(tmp_path, monkeypatch, layout):
    reference = run_conv(tmp_path / "a.pt", **layout)
    assert reference.history[-1]["loss"] < reference.history[0]["loss"]
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_conv(tmp_path / "b.pt", **layout)
    monkeypatch.undo()
    assert run_conv(tmp_path / "b.pt", **layout).status == "resumed"
    want = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
    got = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    assert all(torch.equal(want[key], got[key]) for key in want)


def test_channels_last_trains_the_same_network_as_contiguous(tmp_path):
    """The memory format changes how weights are laid out, not what is learnt (up to float rounding)."""
    last = torch.load(run_conv(tmp_path / "a.pt", channels_last=True, bf16=False).out, weights_only=True)["model"]
    plain = torch.load(run_conv(tmp_path / "b.pt", channels_last=False, bf16=False).out, weights_only=True)["model"]
    assert all(torch.allclose(last[key].float(), plain[key].float(), atol=1e-4) for key in last)


def test_compiled_run_trains_reports_its_warm_up_and_resumes_to_identical_weights(tmp_path, monkeypatch):
    # aot_eager: torch.compile's tracing and autograd split without inductor's C++ code generation, which takes
    # 15-40 s even for this network on a busy 2-core machine (bench/speed.py measures inductor itself)
    compiled = run(tmp_path / "a.pt", epochs=2, compile=True, compile_backend="aot_eager")
    assert compiled.history[-1]["loss"] < compiled.history[0]["loss"]
    assert compiled.history[0]["compile_seconds"] > 0 and "compile_seconds" not in compiled.history[1]
    data = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
    assert not any(key.startswith("_orig_mod") for key in data)  # the plain module's names: loads anywhere
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", epochs=2, compile=True, compile_backend="aot_eager")
    monkeypatch.undo()
    assert run(tmp_path / "b.pt", epochs=2, compile=True, compile_backend="aot_eager").status == "resumed"
    resumed = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    assert all(torch.equal(data[key], resumed[key]) for key in data)


def test_ddp_skips_broadcasting_the_buffers_a_module_keeps_equal_on_every_rank(tmp_path):
    from ssl_cli.pretext.clustering.deepcluster import DeepClusterTask
    from ssl_cli.train.loop import unsynced_buffers

    model = nn.Module()
    model.head = DeepClusterTask(image_size=32, k=4).build_head((8, 2, 2))
    assert unsynced_buffers(model) == ["head.labels", "head.previous"]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, unsynced_buffers(model))
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert {"head.labels", "head.previous"} <= set(wrapped.parameters_to_ignore)
        assert "head.labelled_epoch" not in wrapped.parameters_to_ignore  # still synced from rank 0
    finally:
        torch.distributed.destroy_process_group()
