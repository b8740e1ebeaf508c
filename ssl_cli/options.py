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
Epochs = Annotated[Optional[int], typer.Option("--epochs", help="[default: enough to see ~60k images, 10 to 100 epochs: 60 for 1,000 images, 10 for 60,000]", show_default=False)]
Lr = Annotated[Optional[float], typer.Option("--lr", help="peak learning rate (after warm-up; one-cycle's peak) [default: 0.002]", show_default=False)]
Optimizer = Annotated[Optional[str], typer.Option("--optimizer", help="adamw, sgd, or lars (large batches: biases and norm parameters excluded from adaptation and weight decay) [default: adamw]", show_default=False)]
Momentum = Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum [default: 0.9]", show_default=False)]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="[default: 0.05]", show_default=False)]
WarmupEpochs = Annotated[Optional[float], typer.Option("--warmup-epochs", help="linear warm-up before a cosine or constant schedule (one-cycle has its own) [default: 0]", show_default=False)]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="onecycle (rise over 30% of the steps, cosine fall), cosine (after --warmup-epochs) or constant [default: onecycle]", show_default=False)]
# Batched augmentation and loss of the stages that learn classes (train, retrain, finetune).
MinScale = Annotated[Optional[float], typer.Option("--min-scale", help="smallest area fraction of the random resized crop; 1 = no crop [default: 1]", show_default=False)]
Shift = Annotated[Optional[float], typer.Option("--shift", help="largest random shift in pixels [default: image side / 14: 2 px at 28-32 px]", show_default=False)]
Flip = Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="random horizontal flips [default: on]", show_default=False)]
LabelSmoothing = Annotated[Optional[float], typer.Option("--label-smoothing", help="cross-entropy label smoothing [default: 0.1]", show_default=False)]
Deterministic = Annotated[Optional[bool], typer.Option("--deterministic", help="deterministic algorithms: a resumed run ends with identical weights", show_default=False)]
Width = Annotated[Optional[float], typer.Option("--width", help="channel multiplier of *_lowres alexnet/vgg (e.g. 0.25 for CPU demos)", show_default=False)]
