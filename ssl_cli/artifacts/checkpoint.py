"""Torch checkpoints that hold only tensors and plain types, loaded with `weights_only=True`.

Layout: {"meta": provenance attrs + model description, "model": state_dict, ...stage state}.
The model description (arch, arch_kwargs, input_size, mean, std, task) lets `ssl extract
--model X.pt` rebuild the network with no other flag.
"""

from __future__ import annotations

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
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{path} is not a loadable ssl-cli checkpoint ({first_line}); pass a .pt written by an ssl command"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        raise UserError(f"{path} is a torch file but not an ssl-cli checkpoint (no 'meta'); use --weights for raw weights")
    check_schema(data["meta"].get("schema"), "checkpoint", path)
    return data


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
