"""Help that tells the truth and errors that come at once: every list a user reads comes from the registry
that runs it, required options say so, summaries are whole, and bad settings are all named before torch loads."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import ssl_cli.cli
from ssl_cli.models import catalog
from ssl_cli.models.catalog import CATALOG, ArchEntry
from ssl_cli.pretext import registry

runner = CliRunner()


def help_of(*command: str, app=None) -> str:
    """The help text with each option on one line (wrapped continuation lines joined to their option)."""
    result = runner.invoke(app or ssl_cli.cli.app, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    lines: list[str] = []
    for line in result.output.splitlines():
        if lines and line.startswith(" " * 8) and line.strip():
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return "\n".join(lines)


def test_pretext_help_lists_every_task_by_family_and_every_arch() -> None:
    text = help_of("pretext")
    for family, names in registry.FAMILIES.items():
        assert f"{family}: {', '.join(names)}" in text
    for name in CATALOG:
        assert name in text


@pytest.fixture
def reloaded_cli():
    """The cli module imported afresh (its help texts are built at import), restored afterwards."""
    yield lambda: importlib.reload(ssl_cli.cli)
    importlib.reload(ssl_cli.cli)


def test_a_new_registry_entry_shows_up_in_help(monkeypatch, reloaded_cli) -> None:
    monkeypatch.setitem(registry.FAMILIES, "predictive", {"nextpatch": "nowhere:NextPatchTask"})
    monkeypatch.setitem(registry.TASKS, "nextpatch", "nowhere:NextPatchTask")
    entry = ArchEntry("tinynet_lowres", {"conv1": "features.0"}, 32, 8, "conv1", "conv1", ("conv1",), "a test arch")
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    cli = reloaded_cli()
    text = help_of("pretext", app=cli.app)
    assert "predictive: nextpatch" in text and "tinynet_lowres" in text
    for command in ("extract", "retrain", "train", "self-train"):
        assert "tinynet_lowres" in help_of(command, app=cli.app), command


def test_root_help_keeps_every_summary_whole() -> None:
    text = " ".join(help_of().split())
    assert "…" not in text
    for info in ssl_cli.cli.app.registered_commands:
        summary = info.callback.__doc__.strip().splitlines()[0]
        assert " ".join(summary.split()) in text, summary


@pytest.mark.parametrize("command, flags", [
    ("pretext", ["--task", "--arch", "--data", "--out"]),
    ("cluster", ["--k", "--out"]),
    ("pseudolabel", ["--clusters", "--features", "--out"]),
    ("retrain", ["--labels", "--data", "--arch", "--out"]),
    ("finetune", ["--model", "--data", "--out"]),
    ("self-train", ["--labelled", "--unlabelled", "--out"]),
    ("export", ["--out"]),
])
def test_required_options_are_marked(command: str, flags: list[str]) -> None:
    lines = help_of(command).splitlines()
    for flag in flags:
        line = next(line for line in lines if line.strip().startswith(flag + " "))
        assert "[required]" in line, line
    optional = next(line for line in lines if line.strip().startswith("--force "))
    assert "[required]" not in optional


def test_toy_data_usage_names_its_argument() -> None:
    assert "Usage: ssl toy-data [OPTIONS] OUT" in help_of("toy-data")


def test_choices_are_listed() -> None:
    text = help_of("pretext")
    assert "sgd|adamw|lars" in text and "onecycle|cosine|constant" in text


def test_tasks_lists_each_tasks_options() -> None:
    result = runner.invoke(ssl_cli.cli.app, ["tasks"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "jigsawpp: permutations=None" in result.output and "min_hamming=3" in result.output
    assert "view presets (views=...):" in result.output


BAD_PRETEXT = ["pretext", "--task", "nosuch", "--arch", "resnet19", "--data", "no/such/folder", "--out", "x.pt",
               "--lr", "-1", "--monitor-data", "no/such/eval"]


def test_every_bad_setting_is_named_in_one_line(tmp_path) -> None:
    result = runner.invoke(ssl_cli.cli.app, BAD_PRETEXT)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid settings"), result.output
    for fragment in ("unknown pretext task 'nosuch'", "unknown arch 'resnet19' (did you mean 'resnet18'?)",
                     "--data no/such/folder does not exist", "--lr:", "--monitor-data no/such/eval does not exist"):
        assert fragment in lines[0], fragment


def test_missing_input_files_are_named_with_their_flag(tmp_path) -> None:
    result = runner.invoke(ssl_cli.cli.app, ["self-train", "--labelled", str(tmp_path), "--unlabelled",
                                             str(tmp_path / "gone"), "--teacher", str(tmp_path / "t.pt"),
                                             "--out", str(tmp_path / "st")])
    assert result.exit_code == 2, result.output
    assert "--unlabelled" in result.output and "gone does not exist" in result.output
    assert "--teacher" in result.output and "t.pt does not exist" in result.output


def test_a_bad_flag_answers_before_torch_loads() -> None:
    """Run as a user would; the process must never import torch, torchvision or faiss to say no."""
    probe = ("import sys\nfrom ssl_cli.cli import app\n"
             f"try:\n    app({BAD_PRETEXT!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
             "heavy = sorted(name for name in ('torch', 'torchvision', 'faiss', 'h5py') if name in sys.modules)\n"
             "print('exit', code, 'heavy', heavy)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "exit 2 heavy []" in result.stdout, result.stdout + result.stderr


def test_rules_between_settings_come_with_the_field_errors(tmp_path) -> None:
    result = runner.invoke(ssl_cli.cli.app, ["cluster", "--features", str(tmp_path / "f.h5"), "--k", "1",
                                             "--heads", "3", "--out", str(tmp_path / "c.h5")])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    for fragment in ("f.h5 does not exist", "--k:", "--heads belongs to --method scan"):
        assert fragment in line, fragment
