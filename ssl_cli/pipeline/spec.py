"""The declared pipeline: what the user asked for in stages.yaml (never what ran; see artifacts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ssl_cli.config import format_validation_error
from ssl_cli.errors import UserError

# Config fields that name files a stage reads; `out` is the one it writes.
INPUT_FIELDS = ("data", "model", "weights", "features", "clusters", "labels", "teacher", "labelled",
                "unlabelled", "eval_data", "assign_data", "neighbours")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cmd: Literal["toy-data", "pack", "pretext", "extract", "cluster", "pseudolabel", "retrain", "finetune",
                 "self-train", "train"]
    params: dict[str, Any] = Field(default_factory=dict)

    def output(self) -> str:
        if "out" not in self.params:
            raise ValueError("params.out is required")
        return str(self.params["out"])

    def inputs(self) -> list[str]:
        return [str(self.params[key]) for key in INPUT_FIELDS if self.params.get(key) is not None]


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stages: dict[str, StageSpec]


def load_pipeline(path: Path) -> PipelineSpec:
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a stages file (see the README for the format)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as error:
        raise UserError(format_validation_error(error, str(path), as_flags=False)) from None
    for name, stage in spec.stages.items():
        if "out" not in stage.params:
            raise UserError(f"{path}: stage {name} has no params.out; every stage writes one output")
    return spec


def order_stages(spec: PipelineSpec) -> list[str]:
    """Stage names so that a stage comes after every stage whose output it reads (stable by file order)."""
    producer = {}
    for name, stage in spec.stages.items():
        if stage.output() in producer:
            raise UserError(f"stages {producer[stage.output()]} and {name} both write {stage.output()}; give each its own out")
        producer[stage.output()] = name
    needs = {name: {producer[path] for path in stage.inputs() if path in producer and producer[path] != name}
             for name, stage in spec.stages.items()}
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            raise UserError(f"stages form a cycle through {name}; an output cannot feed its own producer")
        visiting.add(name)
        for upstream in sorted(needs[name], key=list(spec.stages).index):
            visit(upstream)
        visiting.discard(name)
        ordered.append(name)

    for name in spec.stages:
        visit(name)
    return ordered


def upstream_of(spec: PipelineSpec, name: str) -> set[str]:
    """Every stage `name` depends on, directly or not, plus itself."""
    producer = {stage.output(): key for key, stage in spec.stages.items()}
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(producer[path] for path in spec.stages[current].inputs() if path in producer)
    return seen
