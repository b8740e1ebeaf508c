"""Schema strings, fingerprints and provenance shared by every artifact kind."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ssl_cli import CODE_MAJOR, __version__
from ssl_cli.errors import UserError

# kind -> (major, minor) this code writes. A reader accepts any minor of the same major.
SCHEMA_VERSIONS: dict[str, tuple[int, int]] = {
    "features": (1, 0),
    "clusters": (1, 1),  # 1.1: --method scan writes a head (head_weight, head_bias) instead of centroids
    "labels": (1, 0),
    "images": (1, 0),
    "checkpoint": (1, 0),
    "neighbours": (1, 0),  # SCAN's nearest neighbours of every image
}
SCHEMA_PREFIX = "ssl-cli/"


def schema_string(kind: str) -> str:
    major, minor = SCHEMA_VERSIONS[kind]
    return f"{SCHEMA_PREFIX}{kind}@{major}.{minor}"


def parse_schema(text: str) -> tuple[str, int, int] | None:
    """'ssl-cli/features@1.0' -> ('features', 1, 0); None if the text is not a schema string."""
    if not isinstance(text, str) or not text.startswith(SCHEMA_PREFIX) or "@" not in text:
        return None
    kind, _, version = text[len(SCHEMA_PREFIX):].partition("@")
    try:
        major, minor = (int(part) for part in version.split("."))
    except ValueError:
        return None
    return kind, major, minor


def check_schema(found: str | None, expected_kind: str, path: Path) -> None:
    """Raise a UserError naming what was expected and what was found, unless `found` is readable."""
    expected = schema_string(expected_kind)
    parsed = parse_schema(found) if found is not None else None
    if parsed is None:
        raise UserError(
            f"{path} is not an ssl-cli artifact (expected schema {expected}, found "
            f"{found!r}); pass a file written by an ssl command"
        )
    kind, major, _ = parsed
    if kind != expected_kind:
        raise UserError(
            f"{path} holds {kind}, expected {expected_kind} (schema {expected}, found {found}); "
            f"pass a {expected_kind} file"
        )
    if major != SCHEMA_VERSIONS[kind][0]:
        raise UserError(
            f"{path} has schema {found}, this ssl-cli {__version__} reads {expected}; "
            f"{'upgrade ssl-cli' if major > SCHEMA_VERSIONS[kind][0] else 'recompute the file'}"
        )


def fingerprint(stage: str, config: dict[str, Any], inputs: list[str]) -> str:
    """sha256 of the stage name, the result-affecting config, the input fingerprints, the code major."""
    payload = json.dumps(
        {"stage": stage, "config": config, "inputs": inputs, "code_major": CODE_MAJOR},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def file_digest(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, for inputs that carry no fingerprint of their own."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """What produced an artifact; stored as root attributes (HDF5) or under 'meta' (checkpoints)."""

    kind: str
    fingerprint: str
    config: dict[str, Any]
    inputs: list[dict[str, str]] = field(default_factory=list)
    code_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def as_attrs(self) -> dict[str, str]:
        return {
            "schema": schema_string(self.kind),
            "fingerprint": self.fingerprint,
            "config": json.dumps(self.config, sort_keys=True, default=str),
            "inputs": json.dumps(self.inputs),
            "code_version": self.code_version,
            "created": self.created,
        }


def make_provenance(
    kind: str, stage: str, config: dict[str, Any], result_config: dict[str, Any], inputs: list[dict[str, str]]
) -> Provenance:
    """Provenance whose fingerprint covers `result_config` (the fields that change the result) and inputs."""
    return Provenance(
        kind=kind,
        fingerprint=fingerprint(stage, result_config, [item["fingerprint"] for item in inputs]),
        config=config,
        inputs=inputs,
    )
