"""Pretext tasks by name, grouped by the survey's families; an unknown name lists them all by family.

This module imports nothing heavy: help texts and the command line's early checks read it before
torch loads, and a task's module is imported only when the task runs."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import TYPE_CHECKING, Any

from ssl_cli.errors import UserError

if TYPE_CHECKING:
    from ssl_cli.pretext.base import PretextTask

# family -> name -> "module:Class", imported on use so a task's dependencies load only when it runs.
FAMILIES = {
    "handcrafted": {
        "jigsaw": "ssl_cli.pretext.handcrafted.jigsaw:JigsawTask",
        "jigsawpp": "ssl_cli.pretext.handcrafted.jigsawpp:JigsawPlusPlusTask",
        "rotation": "ssl_cli.pretext.handcrafted.rotation:RotationTask",
        "context": "ssl_cli.pretext.handcrafted.context:ContextTask",
        "colorization": "ssl_cli.pretext.handcrafted.colorization:ColorizationTask",
        "inpainting": "ssl_cli.pretext.handcrafted.inpainting:InpaintingTask",
    },
    "contrastive": {
        "simclr": "ssl_cli.pretext.contrastive.simclr:SimCLRTask",
        "simclr2": "ssl_cli.pretext.contrastive.simclr:SimCLRv2Task",
        "moco": "ssl_cli.pretext.contrastive.moco:MoCoTask",
        "moco2": "ssl_cli.pretext.contrastive.moco:MoCoV2Task",
        "pirl": "ssl_cli.pretext.contrastive.pirl:PIRLTask",
    },
    "clustering": {
        "deepcluster": "ssl_cli.pretext.clustering.deepcluster:DeepClusterTask",
        "sela": "ssl_cli.pretext.clustering.sela:SeLaTask",
        "swav": "ssl_cli.pretext.clustering.swav:SwAVTask",
    },
    "reconstructive": {
        "autoencoder": "ssl_cli.pretext.reconstructive.autoencoder:AutoencoderTask",
    },
}
TASKS = {name: path for family in FAMILIES.values() for name, path in family.items()}


def task_names() -> list[str]:
    return sorted(TASKS)


def tasks_by_family() -> str:
    """'handcrafted: jigsaw, ...; contrastive: ...' for help texts and errors."""
    return "; ".join(f"{family}: {', '.join(names)}" for family, names in FAMILIES.items())


def unknown_task(name: str) -> str:
    """The message for a name that is not a task, with the closest spelling."""
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown pretext task {name!r}{hint}; valid tasks by family: {tasks_by_family()}"


def task_class(name: str) -> type[PretextTask]:
    if name not in TASKS:
        raise UserError(unknown_task(name))
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def task_options(name: str) -> dict[str, Any]:
    """The options a task takes (`--task-option KEY=VALUE`) with their defaults: its constructor's keywords."""
    parameters = inspect.signature(task_class(name).__init__).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {key: (None if p.default is inspect.Parameter.empty else p.default)
            for key, p in parameters.items() if key not in ("self", "image_size") and p.kind in kinds}
