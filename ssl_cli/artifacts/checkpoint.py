"""Torch checkpoints that hold only tensors and plain types, loaded with `weights_only=True`.

Layout: {"meta": provenance attrs + model description, "model": state_dict, ...stage state}.
The model description (arch, arch_kwargs, input_size, mean, std, task) lets `ssl extract
--model X.pt` rebuild the network with no other flag.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ssl_cli.artifacts.schema import Provenance, check_schema
from ssl_cli.errors import UserError


def save_checkpoint(path: Path, provenance: Provenance, payload: dict[str, Any]) -> Path:
    """Write `payload` plus provenance to `path` atomically (temporary name, then rename)."""
    meta = dict(payload.pop("meta", {}))
    meta.update(provenance.as_attrs())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"meta": meta, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; never unpickles anything but tensors and plain types."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path or run the stage that writes it")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch's safe loader raises almost anything on a bad file
        raise UserError(
            f"{path} is not a loadable ssl-cli checkpoint ({why_unreadable(path, error)}); "
            "pass a .pt written by an ssl command"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        raise UserError(f"{path} is a torch file but not an ssl-cli checkpoint (no 'meta'); use --weights for raw weights")
    check_schema(data["meta"].get("schema"), "checkpoint", path)
    return data


ZIP_MAGIC = b"PK\x03\x04"


def why_unreadable(path: Path, error: Exception) -> str:
    """A short reason `torch.load` failed on `path`, from the file's first bytes rather than the loader's error:
    on text or random bytes the weights-only unpickler raises KeyError, IndexError or UnpicklingError, whose
    messages ("101", "pop from empty list") say nothing to a user."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as read_error:
        return f"cannot read it: {read_error.strerror or read_error}"
    if not head:
        return "the file is empty"
    if not head.startswith(ZIP_MAGIC):
        kind = "text" if _is_text(head) else "data"
        return f"the file is {kind}, not a torch archive; it starts with {head[:16]!r}"
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        # keep the line naming what the safe loader refused, not the generic advice before it
        detail = next((line.split("error:", 1)[1].strip() for line in text.splitlines() if "Unpickler error:" in line),
                      "it holds objects other than tensors and plain types")
        return f"refused by the weights-only loader: {detail}"
    if "central directory" in text or "failed reading" in text or isinstance(error, EOFError):
        return "the torch archive is truncated or damaged"
    return "a zip archive, but not one written by torch.save"


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(byte >= 32 or byte in b"\t\n\r" for byte in head)


def checkpoint_fingerprint(path: Path) -> str | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file simply has no fingerprint
        return None
    meta = data.get("meta") if isinstance(data, dict) else None
    return meta.get("fingerprint") if isinstance(meta, dict) else None


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """Meta attributes and every tensor's shape and dtype, for `ssl inspect`."""
    data = load_checkpoint(path)
    attrs = dict(data["meta"])
    for key in ("config", "inputs"):  # JSON text in the checkpoint, objects for the reader (as in HDF5 files)
        if isinstance(attrs.get(key), str):
            try:
                attrs[key] = json.loads(attrs[key])
            except json.JSONDecodeError:
                pass
    tensors: list[dict[str, Any]] = []

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append({"name": prefix, "shape": tuple(value.shape), "dtype": str(value.dtype).replace("torch.", "")})
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}/{key}" if prefix else str(key), item)

    for key, value in data.items():
        if key != "meta":
            visit(key, value)
    return {"kind": "checkpoint", "attrs": attrs, "datasets": tensors}
