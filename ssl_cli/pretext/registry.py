"""Pretext tasks by name; an unknown name lists the valid ones."""

from __future__ import annotations

import importlib

from ssl_cli.errors import UserError
from ssl_cli.pretext.base import PretextTask

# name -> "module:Class", imported on use so a task's dependencies load only when it runs.
TASKS = {
    "jigsaw": "ssl_cli.pretext.jigsaw:JigsawTask",
    "jigsawpp": "ssl_cli.pretext.jigsawpp:JigsawPlusPlusTask",
    "rotation": "ssl_cli.pretext.rotation:RotationTask",
    "context": "ssl_cli.pretext.context:ContextTask",
    "colorization": "ssl_cli.pretext.colorization:ColorizationTask",
    "inpainting": "ssl_cli.pretext.inpainting:InpaintingTask",
}


def task_names() -> list[str]:
    return sorted(TASKS)


def task_class(name: str) -> type[PretextTask]:
    if name not in TASKS:
        raise UserError(f"unknown pretext task {name!r}; valid tasks: {', '.join(task_names())}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
