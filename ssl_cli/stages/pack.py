"""`ssl pack`: any image source into one HDF5 store (`images` uint8 N x H x W x 3), resumable.

Unreadable images are skipped and named, as `ssl extract` names them: the `skipped_ids` dataset
(written with the block that found them, `n_skipped` counting them) and the result's `skipped_ids`."""

from __future__ import annotations

import numpy as np

from ssl_cli.artifacts.h5 import RowWriter
from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.outputs import OutputState, plan_output
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.config import PackConfig
from ssl_cli.data.sources import UnreadableImage, open_source, source_input
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult

BLOCK = 512
SHOWN_IDS = 10  # skipped ids named in the result; the file names them all


def provenance_for(cfg: PackConfig, source) -> Provenance:
    return make_provenance("images", "pack", cfg.recorded_config(), cfg.result_config(), [source_input(source)])


def provenance(cfg: PackConfig) -> Provenance:
    return provenance_for(cfg, open_source(cfg.data))


@claim_scope()  # the output stays locked at least until run returns (see artifacts.lock)
def run(cfg: PackConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    source = open_source(cfg.data)
    provenance = provenance_for(cfg, source)
    plan = plan_output(cfg.out, provenance.fingerprint, cfg.force)
    if plan.up_to_date:
        reporter.info(f"{cfg.out} is up to date; skipped")
        return StageResult("pack", cfg.out, plan.state.value, {})
    size = cfg.image_size or _first_size(source)
    writer = RowWriter.resume(cfg.out, provenance.fingerprint) if plan.state is OutputState.RESUME else None
    if writer is None:
        writer = RowWriter.create(cfg.out, provenance, {"images": ((size, size, 3), np.uint8), "sample_ids": ((), str),
                                                        "targets": ((), np.int64)}, chunk_rows=64)
        writer.set_attrs(source_done=0, classes=source.classes)
    # ids named by earlier runs; those of a block whose rows never counted as done are named again when re-read
    skipped = list(writer.handle["skipped_ids"].asstr()[...]) if "skipped_ids" in writer.handle else []
    skipped = skipped[: int(writer.get_attr("n_skipped", 0))]
    total = min(len(source), cfg.limit or len(source))
    try:
        start = int(writer.get_attr("source_done", 0))
        with reporter.progress("pack", total=total, completed=start) as advance:
            for block_start in range(start, total, BLOCK):
                indices = range(block_start, min(block_start + BLOCK, total))
                pixels, kept, bad = [], [], []
                for index in indices:
                    try:
                        image = source.load(index)
                    except UnreadableImage:
                        bad.append(source.sample_ids[index])
                        continue
                    if cfg.image_size:
                        image = image.resize((size, size))
                    elif image.size != (size, size):
                        raise UserError(f"{source.sample_ids[index]} is {image.size[0]}x{image.size[1]}, the first image "
                                        f"{size}x{size}; pass --image-size to resize all images to one square size")
                    pixels.append(np.asarray(image, dtype=np.uint8))
                    kept.append(index)
                # the source position goes into the same flush as the rows (see RowWriter.append)
                if bad:
                    writer.write_array("skipped_ids", np.array(skipped + bad, dtype=object))
                skipped += bad
                position = {"source_done": indices.stop, "n_skipped": len(skipped)}
                if kept:
                    writer.append(images=np.stack(pixels), sample_ids=np.array([source.sample_ids[i] for i in kept], dtype=object),
                                  targets=source.targets[kept], attrs=position)
                else:
                    writer.set_attrs(**position)
                advance(len(indices))
    except BaseException:
        writer.close()
        raise
    rows = writer.rows_done
    writer.commit()
    summary: dict = {"rows": rows, "size": size, "skipped": len(skipped)}
    if skipped:
        reporter.warn(f"skipped {len(skipped)} unreadable image(s), e.g. {', '.join(skipped[:3])}; named in {cfg.out}")
        summary["skipped_ids"] = ", ".join(skipped[:SHOWN_IDS]) + (f", ... ({len(skipped)} in all)"
                                                                   if len(skipped) > SHOWN_IDS else "")
    return StageResult("pack", cfg.out, "written", summary)


def _first_size(source) -> int:
    for index in range(len(source)):
        try:
            width, height = source.load(index).size
        except UnreadableImage:
            continue
        if width != height:
            raise UserError(f"images are {width}x{height}; pass --image-size to pack them as squares")
        return width
    raise UserError(f"no readable image in {source.spec}")
