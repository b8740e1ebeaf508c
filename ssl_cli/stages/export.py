"""Export a checkpoint's model for use outside ssl-cli: a torchvision state dict or safetensors.

torchvision format: a plain `{name: tensor}` `.pt` that loads with `strict=True` into
`getattr(torchvision.models, arch)(weights=None, num_classes=N)`, where N is the checkpoint's
`num_classes` (recorded in the result summary). The classifier is included where shapes allow:
when N differs from 1000 the user builds the stock model with `num_classes=N`. Only the stock
archs export this way; the `*_lowres` variants have no stock torchvision builder. A pretext
checkpoint holds no classifier (the task never trains it): the layers torchvision's layout needs
are filled with a fresh initialisation from the checkpoint's recorded seed, and the summary's
`filled` names them.

safetensors format: the same tensors (made contiguous) for every arch, with string metadata
(arch, num_classes, input_size, source fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torchvision

from ssl_cli.artifacts.checkpoint import load_checkpoint
from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.artifacts.outputs import artifact_fingerprint
from ssl_cli.errors import UserError
from ssl_cli.stages import StageResult

FORMATS = ("torchvision", "safetensors")
STOCK_ARCHS = ("alexnet", "vgg16", "vgg16_bn", "resnet18", "resnet50")


@claim_scope()
def run(checkpoint: Path, fmt: str, out: Path, force: bool = False) -> StageResult:
    """Export `checkpoint`'s model state dict to `out` in `fmt`; never writes a bad export."""
    checkpoint, out = Path(checkpoint), Path(out)
    claim_output(out)  # one writer per output (see artifacts.lock)
    _check_request(fmt, out, force)
    data = load_checkpoint(checkpoint)
    arch, num_classes, input_size = _describe(data["meta"], checkpoint)
    tensors = _model_tensors(data, checkpoint)
    filled: list[str] = []
    if fmt == "torchvision":
        tensors, filled = _fill_untrained(arch, num_classes, tensors, data["meta"])
        _check_loads_into_torchvision(arch, num_classes, tensors)
        _write_atomically(out, lambda tmp: torch.save(tensors, tmp))
    else:
        metadata = {
            "arch": arch,
            "num_classes": str(num_classes),
            "input_size": str(input_size),
            "source_fingerprint": artifact_fingerprint(checkpoint) or "",
        }
        _write_atomically(out, lambda tmp: _save_safetensors(tensors, tmp, metadata))
    summary = {"arch": arch, "format": fmt, "num_classes": num_classes, "tensors": len(tensors)}
    if filled:
        seed = int((data["meta"].get("untrained") or {}).get("init_seed", 0))
        summary["filled"] = (f"{', '.join(filled)}: fresh initialisation (seed {seed}); the checkpoint's training "
                             "never trained these layers, so it did not store them")
    return StageResult("export", out, "written", summary)


def _check_request(fmt: str, out: Path, force: bool) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it or choose another --out")


def _describe(meta: dict[str, Any], checkpoint: Path) -> tuple[str, int, int | None]:
    arch = meta.get("arch")
    if not isinstance(arch, str):
        raise UserError(f"{checkpoint} records no model arch; export a checkpoint written by an ssl training stage")
    arch_kwargs = meta.get("arch_kwargs") or {}
    return arch, int(arch_kwargs.get("num_classes", 1000)), meta.get("input_size")


def _model_tensors(data: dict[str, Any], checkpoint: Path) -> dict[str, torch.Tensor]:
    model = data.get("model")
    if not isinstance(model, dict) or not model:
        raise UserError(f"{checkpoint} holds no model state dict; export a checkpoint written by an ssl stage")
    return {name: tensor.detach().contiguous() for name, tensor in model.items()}


def _fill_untrained(arch: str, num_classes: int, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors plus those of the modules the checkpoint records as untrained (meta "untrained"), built
    as the stock model under the recorded seed; returns them and the filled layer names (e.g. classifier.6)."""
    untrained = meta.get("untrained") or {}
    prefixes = tuple(f"{name}." for name in untrained.get("modules", []))
    if arch not in STOCK_ARCHS or not prefixes:
        return tensors, []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(untrained.get("init_seed", 0)))
        fresh = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes).state_dict()
    missing = [name for name in fresh if name not in tensors and name.startswith(prefixes)]
    layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in missing))
    return {**tensors, **{name: fresh[name] for name in missing}}, layers


def _check_loads_into_torchvision(arch: str, num_classes: int, tensors: dict[str, torch.Tensor]) -> None:
    """Build the stock model and load with strict=True, so only a loadable file is ever written."""
    if arch not in STOCK_ARCHS:
        raise UserError(
            f"arch {arch!r} cannot be exported to torchvision format; exportable archs: "
            f"{', '.join(STOCK_ARCHS)} (the *_lowres variants have no stock torchvision builder); "
            "use --format safetensors, which works for every arch"
        )
    with torch.device("meta"):  # names and shapes only: building VGG16's weights for real takes seconds
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(
        name for name in set(expected) & set(tensors) if expected[name].shape != tensors[name].shape
    )
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", mismatched)) if names]
        raise UserError(
            f"the checkpoint's {arch} weights do not match torchvision.models.{arch}(num_classes={num_classes}) "
            f"({'; '.join(parts)}); use --format safetensors instead"
        )
    model.load_state_dict(tensors, strict=True, assign=True)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file  # imported here so other stages never need safetensors

    save_file(tensors, str(path), metadata=metadata)


def _write_atomically(out: Path, write) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
