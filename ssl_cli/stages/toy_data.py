"""`ssl toy-data`: deterministic procedurally drawn, labelled images (tests, demos, scale benchmarks).

Two forms of one corpus, chosen by `--out` (or `--format`):

- a folder of PNGs, `OUT/<class_name>/<index:06d>.png`, with a `toy-data.json` manifest;
- an HDF5 image store (`OUT.h5`, the layout `ssl pack` writes): `images` uint8 (n, size, size, 3) with
  row i the folder's image i, `sample_ids` the folder's relative paths, `targets` int64 labels and the
  class names as the `classes` attribute. No PNG is written, so ImageNet's row count fits one disk:
  1,281,167 images at 32 px are 4.0 GB. Rows are appended in blocks (`RowWriter`), so a killed run
  resumes after its last whole block and ends with the same rows as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ssl_cli.artifacts.h5 import RowWriter
from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.artifacts.outputs import OutputState, plan_output
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.config import ToyDataConfig
from ssl_cli.data.toy import class_names, default_workers, draw_toy_blocks, toy_sample_id, write_toy_folder
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult

MANIFEST = "toy-data.json"
CHUNK_ROWS = 64  # HDF5 chunk: a single row or a block of rows reads few chunks (the layout `ssl pack` uses)


def provenance(cfg: ToyDataConfig) -> Provenance:
    """Of the HDF5 store; the fingerprint covers n, classes, size and seed (no inputs)."""
    recorded = {**cfg.model_dump(mode="json"), "workers": _workers(cfg)}
    return make_provenance("images", "toy-data", recorded, cfg.result_config(), [])


def folder_params(cfg: ToyDataConfig) -> dict:
    """What a folder's manifest records and compares: the settings that change the images."""
    return cfg.result_config()


@claim_scope()
def run(cfg: ToyDataConfig, force: bool = False, reporter: Reporter | None = None) -> StageResult:
    """Write cfg.n images as a folder or an HDF5 store (`cfg.store`); a re-run resumes or says up to date."""
    reporter = reporter or SilentReporter()
    if cfg.store:
        return _run_store(cfg, force, reporter)
    return _run_folder(cfg, force, reporter)


def _run_store(cfg: ToyDataConfig, force: bool, reporter: Reporter) -> StageResult:
    params = cfg.result_config()
    record = provenance(cfg)
    plan = plan_output(cfg.out, record.fingerprint, force)
    if plan.up_to_date:
        reporter.info(f"{cfg.out} is up to date; skipped")
        return StageResult("toy-data", cfg.out, "up to date", {**params})
    writer = RowWriter.resume(cfg.out, record.fingerprint) if plan.state is OutputState.RESUME else None
    resumed = writer is not None
    if writer is None:
        writer = RowWriter.create(cfg.out, record, {"images": ((cfg.size, cfg.size, 3), np.uint8),
                                                    "sample_ids": ((), str), "targets": ((), np.int64)},
                                  chunk_rows=CHUNK_ROWS)
        writer.set_attrs(classes=class_names(cfg.classes))
    names = class_names(cfg.classes)
    blocks = draw_toy_blocks(cfg.n, cfg.classes, cfg.size, cfg.seed, start=writer.rows_done, workers=_workers(cfg))
    try:
        with reporter.progress("toy images", total=cfg.n, completed=writer.rows_done) as advance:
            for first, images, labels in blocks:
                ids = [toy_sample_id(names[label], first + offset) for offset, label in enumerate(labels.tolist())]
                writer.append(images=images, sample_ids=np.array(ids, dtype=object), targets=labels)
                advance(len(labels))
    except BaseException:
        blocks.close()  # stops the drawing processes before the file is let go
        writer.close()
        raise
    writer.commit()
    return StageResult("toy-data", cfg.out, "resumed" if resumed else "written", {**params, "rows": cfg.n})


def _run_folder(cfg: ToyDataConfig, force: bool, reporter: Reporter) -> StageResult:
    claim_output(cfg.out)  # one writer per folder (see artifacts.lock)
    params = folder_params(cfg)
    manifest = cfg.out / MANIFEST
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"{cfg.out} is a file; give a folder path for toy images, or an .h5 path for an image store")
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
            write_toy_folder(cfg.out, cfg.n, cfg.classes, cfg.size, cfg.seed, progress=progress,
                             workers=_workers(cfg))
        except ValueError as error:
            raise UserError(str(error)) from None
    manifest.write_text(json.dumps({"params": params, "complete": True}))
    return StageResult("toy-data", cfg.out, "written", {**params})


def _workers(cfg: ToyDataConfig) -> int:
    return cfg.workers or default_workers()


def _clear(folder: Path) -> None:
    for png in folder.rglob("*.png"):
        png.unlink()
