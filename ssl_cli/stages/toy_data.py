"""`ssl toy-data`: a deterministic folder of procedurally drawn, labelled PNGs (tests and demos)."""

from __future__ import annotations

import json
from pathlib import Path

from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.config import ToyDataConfig
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult

MANIFEST = "toy-data.json"


@claim_scope()
def run(cfg: ToyDataConfig, force: bool = False, reporter: Reporter | None = None) -> StageResult:
    """Write cfg.n images; a re-run resumes (PNGs already there are kept, each written atomically)."""
    reporter = reporter or SilentReporter()
    claim_output(cfg.out)  # one writer per folder (see artifacts.lock)
    params = cfg.model_dump(mode="json", exclude={"out"})
    manifest = cfg.out / MANIFEST
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"{cfg.out} is a file; give a folder path for toy images")
    if manifest.exists():
        recorded = json.loads(manifest.read_text())
        if recorded["params"] == params and recorded["complete"] and not force:
            reporter.info(f"{cfg.out} is up to date; skipped")
            return StageResult("toy-data", cfg.out, "up to date", {**params})
        if recorded["params"] != params and not force:
            raise UserError(f"{cfg.out} holds toy images made with {recorded['params']}; "
                            "pass --force to regenerate or choose another folder")
        if recorded["params"] != params:
            _clear(cfg.out)
    elif cfg.out.exists() and any(cfg.out.iterdir()):
        raise UserError(f"{cfg.out} exists and is not a toy-data folder; choose an empty or new folder")
    cfg.out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"params": params, "complete": False}))
    with reporter.progress("toy images", total=cfg.n) as advance:
        done = [0]

        def progress(count: int) -> None:
            advance(count - done[0])
            done[0] = count

        try:
            write_toy_folder(cfg.out, cfg.n, cfg.classes, cfg.size, cfg.seed, progress=progress)
        except ValueError as error:
            raise UserError(str(error)) from None
    manifest.write_text(json.dumps({"params": params, "complete": True}))
    return StageResult("toy-data", cfg.out, "written", {**params})


def _clear(folder: Path) -> None:
    for png in folder.rglob("*.png"):
        png.unlink()
