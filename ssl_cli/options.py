"""Options every command shares, declared once. Every option defaults to None ("not passed") so
`config.resolve` can tell a flag from a default; help text comes from the config models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def describe(model: type[BaseModel], name: str) -> str:
    """Help text of a config field: its description plus its default."""
    field = model.model_fields[name]
    default = "" if field.default is PydanticUndefined or field.default is None else f" [default: {field.default}]"
    return f"{field.description or ''}{default}".strip()


ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML file of option defaults; flags override it")]
Force = Annotated[Optional[bool], typer.Option("--force", help="replace an output made with other settings (the old file stays until the new one is complete)", show_default=False)]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N [default: auto]", show_default=False)]
Workers = Annotated[Optional[int], typer.Option("--workers", help="DataLoader worker processes [default: 2]", show_default=False)]
Progress = Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="show progress bars [default: on]", show_default=False)]
Seed = Annotated[Optional[int], typer.Option("--seed", help="random seed [default: 0]", show_default=False)]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="images per batch [default: 64]", show_default=False)]
Out = Annotated[Optional[Path], typer.Option("--out", help="output file", show_default=False)]
Data = Annotated[Optional[str], typer.Option("--data", help="images: a folder (class subfolders give targets), an images .h5, or fashion-mnist:DIR[:train|test]", show_default=False)]


# Options of the shared training loop (pretext, retrain, finetune).
Epochs = Annotated[Optional[int], typer.Option("--epochs", help="[default: 30]", show_default=False)]
Lr = Annotated[Optional[float], typer.Option("--lr", help="peak learning rate, after warm-up [default: 0.01]", show_default=False)]
Optimizer = Annotated[Optional[str], typer.Option("--optimizer", help="sgd or adamw [default: sgd]", show_default=False)]
Momentum = Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum [default: 0.9]", show_default=False)]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="[default: 5e-4]", show_default=False)]
WarmupEpochs = Annotated[Optional[float], typer.Option("--warmup-epochs", help="linear warm-up before the cosine decay [default: 0]", show_default=False)]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="cosine or constant [default: cosine]", show_default=False)]
Deterministic = Annotated[Optional[bool], typer.Option("--deterministic", help="deterministic algorithms: a resumed run ends with identical weights", show_default=False)]
Width = Annotated[Optional[float], typer.Option("--width", help="channel multiplier of *_lowres alexnet/vgg (e.g. 0.25 for CPU demos)", show_default=False)]
