"""Command-line options, declared once from the config models.

A stage command lists the config fields it exposes as `Flag`s; the flag's name, type, help text,
choices, default and "[required]" all come from the pydantic field, so `--help` says what
validation will accept. Groups every training command shares (`TRAINING`, `AUGMENTATION`,
`RUNTIME`) are declared here once. Every option defaults to None ("not passed") so
`config.resolve` can tell a flag from a default and `--config FILE.yaml` can supply it.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class Flag:
    """A config field exposed as `--field-name`. Overrides only where the CLI spelling differs."""

    field: str
    help: str | None = None  # default: the field's description
    flag: str | None = None  # default: --field-name (bools with a True default: --x/--no-x)
    kind: type | None = None  # the type typer parses (default: from the field's annotation)
    metavar: str | None = None
    split: bool = False  # a comma-separated list on the command line
    task_option: bool = False  # goes into `task_options` (pretext), not a field of its own


def group(*fields: str) -> tuple[Flag, ...]:
    return tuple(Flag(name) for name in fields)


# The options of the one training loop: pretext, train, retrain, finetune, self-train.
TRAINING = group("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "warmup_epochs", "schedule",
                 "seed", "deterministic", "compile", "checkpoint_minutes")
# Batched augmentation and loss of the stages that learn classes (train, retrain, finetune, self-train).
AUGMENTATION = group("min_scale", "shift", "flip")
# How a stage runs, never what it computes (outside every fingerprint).
RUNTIME = group("device", "workers", "force", "progress")


def _bare(annotation: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
        return members
    return annotation


def choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The values a Literal field accepts ('auto' of `int | Literal['auto']` included)."""
    annotation = _bare(model.model_fields[name].annotation)
    members = annotation if isinstance(annotation, list) else [annotation]
    found: list[str] = []
    for member in members:
        if typing.get_origin(member) is Literal:
            found += [str(value) for value in typing.get_args(member)]
    return tuple(found)


def cli_type(model: type[BaseModel], name: str) -> type:
    """The type typer parses for a field: text for choices and unions, the field's own type otherwise."""
    annotation = _bare(model.model_fields[name].annotation)
    if annotation in (int, float, bool, Path, str):
        return annotation
    return str  # Literal, `int | Literal[...]`, lists: pydantic converts and validates the text


def describe(model: type[BaseModel], name: str, help: str | None = None) -> str:
    """Help text of a config field: its description, its choices, its default or "[required]"."""
    field = model.model_fields[name]
    text = help if help is not None else (field.description or "")
    options = choices(model, name)
    if options and not all(value in text for value in options):
        text = f"{text}; one of: {', '.join(options)}" if text else f"one of: {', '.join(options)}"
    if field.is_required():
        suffix = " [required]"
    elif field.default is PydanticUndefined or field.default is None or "[default" in text:
        suffix = ""
    elif isinstance(field.default, bool):
        suffix = f" [default: {'on' if field.default else 'off'}]"
    else:
        suffix = f" [default: {field.default}]"
    return f"{text}{suffix}".strip()


def option(model: type[BaseModel], spec: Flag) -> tuple[str, Any]:
    """(parameter name, typer annotation) of one flag."""
    name = spec.field
    flag = spec.flag or "--" + name.replace("_", "-")
    if spec.task_option:  # not a field of the model: the task checks it
        kind, help = spec.kind or str, spec.help or ""
    else:
        kind = spec.kind or (str if spec.split else cli_type(model, name))
        help = describe(model, name, spec.help)
        if kind is bool and spec.flag is None and model.model_fields[name].default is True:
            flag = f"{flag}/--no-{flag[2:]}"
    metavar = spec.metavar
    if metavar is None and not spec.task_option and kind is str and choices(model, name):
        metavar = "|".join(choices(model, name))
    info = typer.Option(flag, help=help, show_default=False, metavar=metavar)
    return name, Annotated[Optional[kind], info]


ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML file of option defaults; flags override it")]


def signature(model: type[BaseModel], flags: tuple[Flag, ...], extra: dict[str, Any] | None = None) -> inspect.Signature:
    """A function signature typer reads: one keyword parameter per flag, then `extra`, then --config."""
    parameters = []
    seen: set[str] = set()
    for spec in flags:
        name, annotation = option(model, spec)
        if name in seen:
            raise ValueError(f"flag for {name!r} declared twice")
        seen.add(name)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    for name, annotation in (extra or {}).items():
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    parameters.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigFile))
    return inspect.Signature(parameters)


def with_signature(function: Callable, sig: inspect.Signature) -> Callable:
    """Give `function(**values)` the parameters typer should read."""
    function.__signature__ = sig  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    return function


def flag_values(flags: tuple[Flag, ...], values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split what typer parsed into (config fields, task options); comma lists split."""
    fields: dict[str, Any] = {}
    task_options: dict[str, Any] = {}
    for spec in flags:
        value = values.get(spec.field)
        if value is not None and spec.split:
            value = [item.strip() for item in str(value).split(",") if item.strip()]
        if value is not None and isinstance(value, Path) and spec.task_option:
            value = str(value)
        (task_options if spec.task_option else fields)[spec.field] = value
    return fields, task_options


# Options of commands that have no config model.
Force = Annotated[Optional[bool], typer.Option("--force", help="replace an existing output (the old file stays until the new one is complete)", show_default=False)]
