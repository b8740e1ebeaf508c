"""The `ssl` command through typer's CliRunner: help, the stage chain, up-to-date skips, --config."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from ssl_cli import __version__
from ssl_cli.cli import app
from ssl_cli.models.registry import arch_names, get_arch


def _command_names() -> list[str]:
    return sorted(command.name or command.callback.__name__.replace("_", "-") for command in app.registered_commands)


def _stored_config(path: Path) -> dict:
    with h5py.File(path, "r") as handle:
        return json.loads(handle.attrs["config"])


def test_every_core_command_is_registered() -> None:
    names = set(_command_names())
    assert {"toy-data", "pack", "extract", "cluster", "pseudolabel", "inspect", "archs", "run"} <= names


def test_root_help_lists_every_command(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0, result.output
    for name in _command_names():
        assert name in result.output


@pytest.mark.parametrize("name", _command_names())
def test_help_of_every_command(cli, name: str) -> None:
    result = cli(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "Traceback" not in result.output


def test_version(cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_archs_lists_every_arch_with_its_layers(cli) -> None:
    result = cli("archs")
    assert result.exit_code == 0, result.output
    for name in arch_names():
        assert name in result.output
        line = next(line for line in result.output.splitlines() if line.startswith(name + " "))
        for layer in get_arch(name).layers:
            assert layer in line


def test_chain_then_inspect_then_up_to_date(cli, tmp_path: Path) -> None:
    toy, features, clusters, labels = tmp_path / "toy", tmp_path / "f.h5", tmp_path / "c.h5", tmp_path / "l.h5"
    steps = {
        toy: ["toy-data", toy, "--n", 48, "--classes", 3, "--size", 32],
        features: ["extract", "--data", toy, "--out", features, "--arch", "alexnet_lowres", "--layer", "conv2",
                   "--workers", 0, "--device", "cpu", "--no-progress"],
        clusters: ["cluster", "--features", features, "--k", 3, "--pca-dim", 8, "--niter", 5, "--out", clusters,
                   "--no-progress"],
        labels: ["pseudolabel", "--clusters", clusters, "--features", features, "--out", labels, "--no-progress"],
    }
    for out, args in steps.items():
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert out.exists()
        assert "written" in result.output

    with h5py.File(labels, "r") as handle:
        assert handle["labels"].shape == (48,)
        assert set(handle["labels"][...].tolist()) <= {0, 1, 2}

    expected_schema = {features: "ssl-cli/features@1.0", clusters: "ssl-cli/clusters@1.1", labels: "ssl-cli/labels@1.0"}
    for path, schema in expected_schema.items():
        result = cli("inspect", path)
        assert result.exit_code == 0, result.output
        assert schema in result.output
        assert "fingerprint" in result.output and "config" in result.output
    assert "features" in cli("inspect", features).output
    assert "centroids" in cli("inspect", clusters).output
    assert "confidence" in cli("inspect", labels).output

    # A second identical run of every stage skips, says so, and touches nothing.
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in (features, clusters, labels)}
    toy_before = sorted((p.name, p.stat().st_mtime_ns) for p in toy.rglob("*"))
    for out, args in steps.items():
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "up to date" in result.output, result.output
    after = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in (features, clusters, labels)}
    assert after == before
    assert sorted((p.name, p.stat().st_mtime_ns) for p in toy.rglob("*")) == toy_before


def test_extract_an_untrained_thin_net(cli, toy_dir: Path, tmp_path: Path) -> None:
    """--width reaches build_model without a checkpoint, enters the fingerprint, and is recorded."""
    common = ["extract", "--data", toy_dir, "--arch", "alexnet_lowres", "--layer", "conv5", "--workers", 0,
              "--device", "cpu", "--no-progress"]
    thin, full = tmp_path / "thin.h5", tmp_path / "full.h5"
    assert cli(*common, "--width", 0.5, "--out", thin).exit_code == 0
    assert cli(*common, "--out", full).exit_code == 0
    with h5py.File(thin, "r") as got, h5py.File(full, "r") as wide:
        assert got["features"].shape[1] == 128 and wide["features"].shape[1] == 256  # conv5: 256 x width channels
        assert got.attrs["fingerprint"] != wide.attrs["fingerprint"]
        assert json.loads(got.attrs["config"])["width"] == 0.5


def test_inspect_of_a_checkpoint(cli, tmp_path: Path) -> None:
    import torch

    from ssl_cli.artifacts.checkpoint import save_checkpoint
    from ssl_cli.artifacts.schema import Provenance

    path = save_checkpoint(tmp_path / "m.pt", Provenance("checkpoint", "abc123", {"lr": 0.1}),
                           {"model": {"w": torch.zeros(3, 4)}, "meta": {"arch": "alexnet_lowres"}})
    result = cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "ssl-cli/checkpoint@1.0" in result.output
    assert "model/w" in result.output and "3x4" in result.output


def test_config_file_gives_defaults_and_flags_override(cli, features_h5: Path, tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("k: 3\nniter: 4\npca-dim: 8\nseed: 5\n")
    out = tmp_path / "c.h5"
    result = cli("cluster", "--config", config, "--features", features_h5, "--out", out, "--niter", 7, "--no-progress")
    assert result.exit_code == 0, result.output
    stored = _stored_config(out)
    assert stored["k"] == 3  # from the file
    assert stored["pca_dim"] == 8  # from the file, dashed key
    assert stored["seed"] == 5
    assert stored["niter"] == 7  # the flag wins over the file
    assert stored["max_points_per_centroid"] == 256  # neither: the model's default
    with h5py.File(out, "r") as handle:
        assert handle["centroids"].shape == (3, 8)


def test_config_file_with_an_unknown_field_is_named(cli, features_h5: Path, tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("k: 3\nclusters_count: 9\n")
    out = tmp_path / "c.h5"
    result = cli("cluster", "--config", config, "--features", features_h5, "--out", out)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "clusters-count" in lines[0] and "unknown field" in lines[0] and str(config) in lines[0]
    assert not out.exists()


def test_every_bad_field_is_named_on_one_line(cli, features_h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    result = cli("cluster", "--features", features_h5, "--out", out, "--k", 0, "--niter", -1, "--pca-dim", -3)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    for flag in ("--k", "--niter", "--pca-dim"):
        assert flag in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_missing_required_setting_is_named(cli, features_h5: Path, tmp_path: Path) -> None:
    result = cli("cluster", "--features", features_h5, "--out", tmp_path / "c.h5")
    assert result.exit_code == 2
    assert result.output.startswith("error:")
    assert "--k" in result.output and "required" in result.output


def test_a_crash_is_one_line_with_exit_1_and_a_traceback_only_with_debug(cli, features_h5: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    from ssl_cli.stages import cluster

    def broken(cfg, reporter=None):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(cluster, "run", broken)
    args = ("cluster", "--features", features_h5, "--out", tmp_path / "c.h5", "--k", 3)
    result = cli(*args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith("error: RuntimeError: simulated failure")
    assert "Traceback" not in result.output
    debug = cli("--debug", *args)
    assert debug.exit_code == 1
    assert "Traceback" in debug.output


def test_clusters_record_only_the_settings_their_method_used(cli, features_h5, tmp_path) -> None:
    """A k-means clusters file names no SCAN option, and `--force` (an action) is not a setting."""
    out = tmp_path / "c.h5"
    assert cli("cluster", "--features", str(features_h5), "--k", "3", "--out", str(out), "--force").exit_code == 0
    with h5py.File(out) as handle:
        config = json.loads(handle.attrs["config"])
    assert config["k"] == 3 and config["niter"] == 20
    for name in ("force", "method", "heads", "neighbours_k", "entropy_weight", "self_label", "scan_epochs"):
        assert name not in config, name
