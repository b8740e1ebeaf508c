"""The output policy every stage follows: up to date, resume, fresh, or refuse without --force."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ssl_cli.artifacts.h5 import partial_path, read_root_attrs
from ssl_cli.artifacts.lock import claim_output, writer_process
from ssl_cli.errors import UserError


class OutputState(str, Enum):
    UP_TO_DATE = "up to date"
    RESUME = "resume"
    FRESH = "fresh"


@dataclass(frozen=True)
class OutputPlan:
    state: OutputState
    out: Path

    @property
    def up_to_date(self) -> bool:
        return self.state is OutputState.UP_TO_DATE


def artifact_fingerprint(path: Path) -> str | None:
    """The fingerprint recorded in an HDF5 artifact or a checkpoint; None if there is none."""
    if not path.exists() or path.is_dir():
        return None
    try:
        return read_root_attrs(path).get("fingerprint")
    except OSError:
        # imported here: torch (~700 MB resident) loads only when a checkpoint is actually read
        from ssl_cli.artifacts.checkpoint import checkpoint_fingerprint

        return checkpoint_fingerprint(path)


def plan_output(out: Path, fingerprint: str, force: bool) -> OutputPlan:
    """Decide what a stage does with `out` (and `<out>.partial`) for this fingerprint.

    First claims `out` (see `lock.claim_output`): a second process writing the same output stops
    here with a one-line error, before it reads or touches anything. The claim lasts until the
    caller's `claim_scope()` ends, i.e. past the final rename.

    An existing complete output is never touched here: with --force the stage writes
    `<out>.partial` and only the final rename replaces it, so an interrupted forced run
    still leaves the old, whole file in place.
    """
    claim_output(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path")
    if out.exists() and not force:
        found = artifact_fingerprint(out)
        if found == fingerprint:
            return OutputPlan(OutputState.UP_TO_DATE, out)
        what = "another fingerprint" if found else "no ssl-cli fingerprint"
        raise UserError(
            f"{out} exists with {what} (it was made from other inputs or settings); "
            "pass --force to replace it or choose another --out"
        )
    partial = partial_path(out)
    if partial.exists() and not force and artifact_fingerprint(partial) == fingerprint:
        return OutputPlan(OutputState.RESUME, out)
    if partial.exists() and writer_process():  # under torchrun the other ranks only read
        partial.unlink()
    return OutputPlan(OutputState.FRESH, out)
