"""Plan and execute a stages file.

A pipeline owns the outputs it declares: a stage whose output is stale (made from other settings
or inputs) is re-run and replaces it, as `make` or DVC would, the old file staying whole until the
new one is renamed over it. Everything else follows the stages' own skip/resume rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ssl_cli.artifacts.h5 import partial_path
from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.artifacts.outputs import artifact_fingerprint
from ssl_cli.config import (
    ClusterConfig,
    ExtractConfig,
    FinetuneConfig,
    PackConfig,
    PretextConfig,
    PseudolabelConfig,
    RetrainConfig,
    SelfTrainConfig,
    SupervisedConfig,
    ToyDataConfig,
    format_validation_error,
)
from ssl_cli.errors import UserError
from ssl_cli.pipeline.spec import (
    INPUT_FIELDS,
    PipelineSpec,
    StageSpec,
    load_pipeline,
    order_stages,
    upstream_of,
)
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import (
    StageResult,
    cluster,
    extract,
    finetune,
    pack,
    pretext,
    pseudolabel,
    retrain,
    self_train,
    toy_data,
    train,
)

COMMANDS: dict[str, tuple[type, Any]] = {
    "toy-data": (ToyDataConfig, toy_data),
    "pack": (PackConfig, pack),
    "pretext": (PretextConfig, pretext),
    "extract": (ExtractConfig, extract),
    "cluster": (ClusterConfig, cluster),
    "pseudolabel": (PseudolabelConfig, pseudolabel),
    "retrain": (RetrainConfig, retrain),
    "finetune": (FinetuneConfig, finetune),
    "self-train": (SelfTrainConfig, self_train),
    "train": (SupervisedConfig, train),
}


RUNNING = "{target} is being run by process {pid}; wait for it or choose another stages file"


@dataclass
class Step:
    name: str
    stage: StageSpec
    action: str  # "run", "skip", "resume"
    why: str


def resolve_paths(stage: StageSpec, base: Path) -> dict[str, Any]:
    """Relative paths in a stages file are relative to the file's folder."""
    params = dict(stage.params)
    for key in (*INPUT_FIELDS, "out"):
        value = params.get(key)
        if isinstance(value, str) and ":" not in value and not Path(value).is_absolute():
            params[key] = str(base / value)
    return params


def build_config(name: str, stage: StageSpec, base: Path, force: bool) -> Any:
    from pydantic import ValidationError

    model, _ = COMMANDS[stage.cmd]
    params = resolve_paths(stage, base)
    if "force" in model.model_fields:
        params["force"] = force
    try:
        return model.model_validate(params)
    except ValidationError as error:
        raise UserError(f"stage {name}: " + format_validation_error(error, as_flags=False)) from None


def output_state(name: str, stage: StageSpec, base: Path) -> tuple[str, str]:
    """(action, why) for one stage whose inputs exist: skip, resume, or run."""
    cfg = build_config(name, stage, base, force=False)
    if stage.cmd == "toy-data" and not cfg.store:  # a folder keeps a manifest; a store is an artifact like any
        manifest = cfg.out / toy_data.MANIFEST
        if not manifest.exists():
            return "run", "no output yet"
        recorded = json.loads(manifest.read_text())
        if recorded["params"] != toy_data.folder_params(cfg):
            return "run", "stale: settings changed (replaces the output)"
        return ("skip", "up to date") if recorded["complete"] else ("resume", "interrupted earlier")
    _, module = COMMANDS[stage.cmd]
    fingerprint = module.provenance(cfg).fingerprint
    # A stage whose output is a folder (finetune) says where its fingerprint is recorded.
    found = module.recorded_fingerprint(cfg) if hasattr(module, "recorded_fingerprint") else artifact_fingerprint(cfg.out)
    if found == fingerprint:
        return "skip", "up to date"
    if found is not None:
        return "run", "stale: settings or inputs changed (replaces the output)"
    if artifact_fingerprint(partial_path(cfg.out)) == fingerprint:
        return "resume", "interrupted earlier"
    if cfg.out.is_dir() and any(cfg.out.iterdir()):
        return "resume", "interrupted earlier (finished parts are kept)"
    return "run", "no output yet"


def make_plan(spec: PipelineSpec, base: Path, until: str | None, force: list[str]) -> list[Step]:
    unknown = [name for name in [*force, *([until] if until else [])] if name not in spec.stages and name != "all"]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(spec.stages)}")
    for name, stage in spec.stages.items():
        # Every stage's settings are checked before anything runs, so a typo in the last stage
        # does not surface only after the first ones have spent their time.
        build_config(name, stage, base, force=False)
    wanted = upstream_of(spec, until) if until else set(spec.stages)
    steps: list[Step] = []
    changing: set[str] = set()
    for name in order_stages(spec):
        if name not in wanted:
            continue
        stage = spec.stages[name]
        upstream = upstream_of(spec, name) - {name}
        if name in force or "all" in force:
            action, why = "run", "forced"
        elif upstream & changing:
            action, why = "run", f"after {', '.join(sorted(upstream & changing))}"
        else:
            action, why = output_state(name, stage, base)
        if action != "skip":
            changing.add(name)
        steps.append(Step(name, stage, action, why))
    return steps


def plan(stages_file: Path, until: str | None = None, force: list[str] | None = None) -> list[dict[str, str]]:
    spec = load_pipeline(stages_file)
    return [{"stage": step.name, "command": step.stage.cmd, "action": step.action, "why": step.why}
            for step in make_plan(spec, stages_file.parent, until, force or [])]


def claim_run(stages_file: Path) -> None:
    """One `ssl run` of a stages file at a time: hold `<stages file>.lock` until the outermost
    `claim_scope()` ends. Taken before planning: a run in progress may be rewriting outputs."""
    if stages_file.exists():  # a missing file fails in planning, with nothing to protect
        claim_output(stages_file, RUNNING)


@claim_scope()
def execute(stages_file: Path, until: str | None = None, force: list[str] | None = None,
            reporter: Reporter | None = None, on_result: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """Run the plan in order. Each stage is re-planned just before it runs, since upstream stages
    have only now written its inputs.

    Each stage claims its own output as when it is started on its own; the claims last until the
    whole run ends (see `artifacts.lock`)."""
    claim_run(stages_file)
    reporter = reporter or SilentReporter()
    spec = load_pipeline(stages_file)
    base = stages_file.parent
    force = force or []
    results = []
    recomputed: set[str] = set()
    for step in make_plan(spec, base, until, force):
        stage = step.stage
        forced = step.name in force or "all" in force
        upstream = upstream_of(spec, step.name) & recomputed
        if forced:
            action, why = "run", "forced"
        elif upstream:
            # As planned: a stage recomputed in this run makes everything downstream run again,
            # even where its new output carries the same fingerprint as the old one.
            action, why = "run", f"after {', '.join(sorted(upstream))}"
        else:
            action, why = output_state(step.name, stage, base)
        replace = forced or bool(upstream) or why.startswith("stale")
        reporter.info(f"[{step.name}] ssl {stage.cmd}: {action} ({why})")
        cfg = build_config(step.name, stage, base, force=replace)
        _, module = COMMANDS[stage.cmd]
        if stage.cmd == "toy-data":
            result = module.run(cfg, force=replace, reporter=reporter)
        else:
            result = module.run(cfg, reporter)
        results.append(result)
        if result.status != "up to date":
            recomputed.add(step.name)
        if on_result:
            on_result(result)
    return results
