"""The `ssl` command: one thin command per stage. Parse flags, resolve the config, call the stage,
print the result. No logic lives here.

A stage command is its config model plus the list of flags it exposes (`options.Flag`); the groups
every training command shares are declared once in `options`. Settings are validated, input files
checked and names looked up before a stage module (and with it torch) is imported, so a bad flag
answers at once and every bad setting of the command is named in one line."""

from __future__ import annotations

import contextvars
import functools
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
import typer.core

from ssl_cli import __version__, ui
from ssl_cli.artifacts.lock import claim_output, claim_scope
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
    resolve,
)
from ssl_cli.data.spec import SOURCE_FORMS
from ssl_cli.errors import UserError
from ssl_cli.models.catalog import arch_names
from ssl_cli.options import (
    AUGMENTATION,
    RUNTIME,
    TRAINING,
    Flag,
    Force,
    describe,
    flag_values,
    group,
    signature,
    with_signature,
)
from ssl_cli.pretext.registry import tasks_by_family

# Set by the root callback on every invocation; read by the error guard of each command.
_DEBUG: contextvars.ContextVar[bool] = contextvars.ContextVar("debug", default=False)

app = typer.Typer(
    name="ssl",
    help="Self-supervised representation learning as resumable stages: "
    "pretext -> extract -> cluster -> pseudolabel -> retrain -> finetune, and self-train.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show "[default: X]" literally
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ssl-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = None,
) -> None:
    _DEBUG.set(debug)


class _Command(typer.core.TyperCommand):
    """Usage lines in the common notation: a required argument is `OUT`, not typer's `{OUT}`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.*)\}((\.\.\.)?)$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


def command(name: str | None = None, **kwargs) -> Callable:
    """Register a command whose errors become one line: UserError -> exit 2, anything else -> exit 1.

    The command's one-line summary in `ssl --help` is the first line of its docstring, in full.
    The outputs a command claims (see `artifacts.lock`) are released when it ends."""

    def wrap(function: Callable) -> Callable:
        @functools.wraps(function)
        def guarded(*args, **kw):
            debug = _DEBUG.get()
            try:
                with claim_scope():
                    return function(*args, **kw)
            except typer.Exit:
                raise
            except UserError as error:
                if debug:
                    traceback.print_exc()
                ui.error(str(error))
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                ui.error("interrupted; run the same command again to resume")
                raise typer.Exit(130) from None
            except Exception as error:  # noqa: BLE001 - the one place that turns crashes into a message
                if debug:
                    traceback.print_exc()
                ui.error(f"{type(error).__name__}: {error} (run with `ssl --debug ...` for the traceback)")
                raise typer.Exit(1) from None

        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else None
        return app.command(name, short_help=summary, cls=_Command, **kwargs)(guarded)

    return wrap


def _reporter(cfg) -> ui.RichReporter:
    # Under torchrun only rank 0 draws progress bars; the others would print the same lines again.
    main_rank = os.environ.get("RANK", "0") == "0"
    return ui.RichReporter(enabled=getattr(cfg, "progress", True) and main_rank)


def _task_options(config: Path | None, pairs: list[str] | None, named: dict) -> dict | None:
    """Task options from --config's task_options, then --task-option KEY=VALUE, then the named flags."""
    import yaml

    from ssl_cli.config import load_yaml

    options = dict(load_yaml(config).get("task_options", {})) if config else {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--task-option {pair!r} must look like KEY=VALUE, e.g. --task-option gap=4")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    options.update({key: value for key, value in named.items() if value is not None})
    return options or None


TaskOption = Annotated[Optional[list[str]], typer.Option(
    "--task-option", metavar="KEY=VALUE", help="any other task option, KEY=VALUE (repeatable), e.g. temperature=0.5, views=grey; "
    "`ssl tasks` lists every task's options and the view presets", show_default=False)]


def stage_command(name: str, model: type, flags: tuple[Flag, ...]) -> Callable:
    """A command exposing `flags` of `model`: the decorated function receives the resolved, checked config.

    Pretext's task-specific flags (`Flag(task_option=True)`) and `--task-option KEY=VALUE` are gathered into
    `task_options`."""
    takes_task_options = "task_options" in model.model_fields
    extra = {"task_option": TaskOption} if takes_task_options else {}

    def wrap(body: Callable[[Any], None]) -> Callable:
        def parsed(**values: Any) -> None:
            config_file = values.pop("config", None)
            fields, named_options = flag_values(flags, values)
            if takes_task_options:
                fields["task_options"] = _task_options(config_file, values.get("task_option"), named_options)
            body(resolve(model, config_file, fields, check_inputs=True))

        parsed.__name__ = parsed.__qualname__ = body.__name__
        parsed.__doc__ = body.__doc__
        return command(name)(with_signature(parsed, signature(model, flags, extra)))

    return wrap


def _run_stage(module: str, cfg: Any) -> Any:
    """Import a stage (and torch with it) only once the settings are known to be good, and run it."""
    import importlib

    stage = importlib.import_module(f"ssl_cli.stages.{module}")
    result = stage.run(cfg, _reporter(cfg))
    ui.show_result(result)
    return result


ARCHS = f"`ssl archs` describes them: {', '.join(arch_names())}"
DATA = Flag("data")
OUT = Flag("out")


@command("toy-data")
def toy_data(
    out: Annotated[Path, typer.Argument(help=ToyDataConfig.model_fields["out"].description, metavar="OUT", show_default=False)],
    n: Annotated[Optional[int], typer.Option("--n", help=describe(ToyDataConfig, "n"), show_default=False)] = None,
    classes: Annotated[Optional[int], typer.Option("--classes", help=describe(ToyDataConfig, "classes"), show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option("--size", help=describe(ToyDataConfig, "size"), show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=describe(ToyDataConfig, "seed"), show_default=False)] = None,
    format: Annotated[Optional[str], typer.Option("--format", help=describe(ToyDataConfig, "format"), metavar="auto|folder|h5", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help=describe(ToyDataConfig, "workers"), show_default=False)] = None,
    force: Force = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of option defaults; flags override it")] = None,
) -> None:
    """Write deterministic toy images of C classes (shapes x colours x textures, with noise): a folder of PNGs, or
    with OUT ending in .h5 one image store for --data (ImageNet's 1,281,167 rows at 32 px: 4.0 GB, no PNG files).
    Re-running the same command resumes an interrupted run; a finished one is up to date."""
    cfg = resolve(ToyDataConfig, config, {"out": out, "n": n, "classes": classes, "size": size, "seed": seed,
                                          "format": format, "workers": workers})
    from ssl_cli.stages import toy_data as stage

    ui.show_result(stage.run(cfg, force=bool(force), reporter=ui.RichReporter()))


@stage_command("pack", PackConfig, (DATA, OUT, *group("image_size", "limit"), Flag("force"), Flag("progress")))
def pack(cfg: PackConfig) -> None:
    """Pack an image source into one HDF5 store (images uint8 N x H x W x 3, sample_ids, targets)."""
    _run_stage("pack", cfg)


@stage_command("extract", ExtractConfig, (
    DATA, OUT, Flag("model"), Flag("arch", help=f"architecture when no --model is given ({ARCHS})"), Flag("weights"),
    *group("layer", "pool", "pool_size", "image_size", "width", "dtype", "batch_size", "seed"), *RUNTIME))
def extract(cfg: ExtractConfig) -> None:
    """Features of one named layer for every image -> features.h5 (resumable, streamed)."""
    _run_stage("extract", cfg)


@stage_command("cluster", ClusterConfig, (
    *group("features", "k"), OUT, Flag("pca_dim", metavar="auto|<int>"),
    *group("pca_sample", "niter", "max_points_per_centroid", "backend", "gpu", "chunk_rows", "method", "model"),
    *group("data", "assign_data", "layer", "pool_size", "neighbours", "neighbours_k", "neighbours_method", "heads",
           "entropy_weight", "scan_epochs", "self_label", "self_label_epochs", "threshold", "self_label_lr",
           "batch_size", "lr", "scan_backbone", "backbone_lr", "seed"),
    *RUNTIME))
def cluster(cfg: ClusterConfig) -> None:
    """k-means of PCA-whitened, L2-normalised features, or SCAN (--method scan) -> clusters.h5.

    SCAN trains the pretext network with its heads by default (--scan-backbone train, as published) and links
    the trained network beside the output as <stem>.network.pt (for `ssl extract --model`), its features as
    <stem>.features.h5; --scan-backbone frozen trains the heads alone on the network's features."""
    _run_stage("cluster", cfg)


@stage_command("pseudolabel", PseudolabelConfig, (*group("clusters", "features"), OUT, Flag("chunk_rows"),
                                                  Flag("force"), Flag("progress")))
def pseudolabel(cfg: PseudolabelConfig) -> None:
    """Nearest centroid (after the clusters' PCA + L2) for every row -> labels.h5 with confidence."""
    _run_stage("pseudolabel", cfg)


def _jigsaw(field: str, help: str) -> Flag:
    return Flag(field, help=f"jigsaw: {help}", kind=Path if field == "permutation_file" else
                (float if field == "grayscale_prob" else int), task_option=True)


@stage_command("pretext", PretextConfig, (
    Flag("task", help=f"pretext task, by family: {tasks_by_family()}; options: --task-option, `ssl tasks`"),
    Flag("arch", help=f"backbone ({ARCHS})"), DATA, OUT, Flag("width"),
    Flag("image_size", help="crop a sample is cut from [default: 225 for jigsaw, else the arch's input size]"),
    _jigsaw("permutations", "size of the permutation set [1000; jigsawpp 701]"),
    _jigsaw("permutation_file", "a set written by `ssl permutations` (.json or .npy)"),
    _jigsaw("min_hamming", "required minimum Hamming distance [jigsawpp: 3]"),
    _jigsaw("grayscale_prob", "probability of a grey image [0; jigsawpp 0.7]"),
    _jigsaw("max_replaced", "up to this many tiles from another image [0; jigsawpp 2]"),
    _jigsaw("tile_size", "tile side [64 for 75-px cells]"),
    Flag("monitor_data", help="labelled images (a source, e.g. fashion-mnist:DIR:test): cosine kNN top-1 (k=20) of "
         "the trunk's features, in the metrics and the progress output"),
    Flag("monitor_every", help="epochs between kNN measurements (the last epoch is always measured)"),
    *TRAINING, *RUNTIME))
def pretext(cfg: PretextConfig) -> None:
    """Train a backbone on a pretext task -> pretext.pt (+ .metrics.jsonl); resumes after a kill."""
    _run_stage("pretext", cfg)


@stage_command("retrain", RetrainConfig, (
    Flag("labels"), DATA, Flag("arch", help=f"target architecture, trained from scratch ({ARCHS})"), OUT,
    *group("sampling", "width", "image_size", "grayscale_prob", "color_jitter", "label_smoothing"),
    *AUGMENTATION, *TRAINING, *RUNTIME))
def retrain(cfg: RetrainConfig) -> None:
    """Train the target arch on pseudo-labels -> student.pt (knowledge transfer; resumes after a kill)."""
    _run_stage("retrain", cfg)


@stage_command("train", SupervisedConfig, (
    DATA, Flag("arch", help=f"architecture trained from scratch ({ARCHS}; convnet_bn_lowres for small images)"), OUT,
    *group("eval_data", "labels_per_class", "width", "dropout", "image_size", "label_smoothing"),
    *AUGMENTATION, *TRAINING, *RUNTIME))
def train_supervised(cfg: SupervisedConfig) -> None:
    """Train an arch from scratch on labelled images -> model.pt: the supervised baseline."""
    _run_stage("train", cfg)


@stage_command("finetune", FinetuneConfig, (
    Flag("model"), DATA, Flag("eval_data"), Flag("mode"),
    Flag("out", help="output folder (metrics.json, finetuned.pt / linear.pt)"),
    Flag("layers", split=True, help="comma-separated layers: linear probes them all at once, knn reads the first "
         "[default: conv layers / the feature layer]"),
    *group("freeze_through", "labels_per_class", "linear_norm", "knn_k", "knn_temperature", "image_size",
           "label_smoothing"),
    *AUGMENTATION, *TRAINING, *RUNTIME))
def finetune(cfg: FinetuneConfig) -> None:
    """Evaluate a checkpoint on labelled images: full finetuning, linear probes per layer, or kNN."""
    _run_stage("finetune", cfg)


@stage_command("self-train", SelfTrainConfig, (
    *group("labelled", "unlabelled", "eval_data", "out", "teacher", "rounds"),
    Flag("arch", help=f"architecture trained here ({ARCHS}) [default: the teacher's]"),
    *group("student_arch", "width", "student_width", "image_size", "labels_per_class", "threshold", "balance"),
    Flag("soft", flag="--soft/--hard", help="learn the teacher's probabilities (soft) or its argmax (hard)"),
    *group("temperature", "unlabelled_weight", "unlabelled_ratio", "randaugment_ops", "randaugment_magnitude",
           "dropout", "stochastic_depth"),
    *AUGMENTATION, *TRAINING, *RUNTIME))
def self_train(cfg: SelfTrainConfig) -> None:
    """Teacher-student self-training rounds (Noisy Student) -> DIR/round-r/{labels.h5, student.pt, metrics.json}."""
    from ssl_cli.stages import self_train as stage

    _run_stage("self_train", cfg)
    ui.show_table("accuracy per round", stage.round_table(cfg.out))


@command()
def tasks() -> None:
    """List the pretext tasks by family, with the options each takes (--task-option KEY=VALUE)."""
    from ssl_cli.data.views import PRESETS
    from ssl_cli.pretext.registry import FAMILIES, task_options

    for family, names in FAMILIES.items():
        ui.out.print(f"[bold]{family}[/bold]")
        for name in names:
            options = ", ".join(f"{key}={value}" for key, value in task_options(name).items()) or "none"
            ui.out.print(f"  {name}: {options}", highlight=False)
    ui.out.print(f"view presets (views=...): {', '.join(PRESETS)}", highlight=False)


@command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="an ssl-cli model checkpoint", metavar="CHECKPOINT", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="torchvision (loads strict into torchvision.models.<arch>) or safetensors")] = "torchvision",
    out: Annotated[Optional[Path], typer.Option("--out", help="output file [required]", show_default=False)] = None,
    force: Force = None,
) -> None:
    """Export a checkpoint's weights for torchvision's stock builders or as safetensors."""
    from ssl_cli.stages import export as stage

    if out is None:
        raise UserError("--out is required: the file to write")
    ui.show_result(stage.run(checkpoint, fmt, out, force=bool(force)))


@command()
def permutations(
    n: Annotated[int, typer.Option("--n", help="number of permutations")] = 1000,
    min_hamming: Annotated[Optional[int], typer.Option("--min-hamming", help="fail unless every pair differs in at least this many positions", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the greedy selection")] = 0,
    out: Annotated[Path, typer.Option("--out", help="file for --permutation-file: .json (with seed and minimum distance) or .npy (a bare N x 9 array)")] = Path("permutations.json"),
    force: Force = None,
) -> None:
    """Choose a jigsaw permutation set greedily for maximal minimum Hamming distance."""
    from ssl_cli.pretext.handcrafted.permutations import (
        check_suffix,
        min_pairwise_hamming,
        save_permutations,
        select_permutations,
    )

    check_suffix(out)
    claim_output(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it or choose another --out")
    if n < 2:
        raise UserError("--n must be at least 2")
    chosen = select_permutations(n, min_hamming=min_hamming, seed=seed)
    reached = min_pairwise_hamming(chosen)
    save_permutations(out, chosen, reached, seed)
    ui.out.print(f"wrote {n} permutations with minimum Hamming distance {reached} to {out}")


@command()
def inspect(path: Annotated[Path, typer.Argument(help="any ssl-cli artifact: .h5 or .pt", metavar="FILE", show_default=False)]) -> None:
    """Show an artifact's schema, provenance (config, inputs) and datasets."""
    from ssl_cli.stages import inspect as stage

    ui.show_artifact(str(path), stage.run(path))


@command()
def archs() -> None:
    """List the architectures and their named layers."""
    from ssl_cli.models.registry import arch_names, get_arch

    for name in arch_names():
        spec = get_arch(name)
        ui.out.print(f"[bold]{name}[/bold] ({spec.description}; input {spec.input_size}px): {', '.join(spec.layers)}",
                     soft_wrap=True)
    ui.out.print("Small images (28-32 px): convnet_bn_lowres is the best from-scratch net per unit of compute "
                 "(bench/recipes.py: 0.84-0.85 on Fashion-MNIST from 100 labels per class); alexnet_bn_lowres is the "
                 "AlexNet of the knowledge-transfer recipe with batch norm, a point behind; vgg16_bn_lowres and "
                 "resnet18_lowres are the deeper choices. The *_lowres archs without _bn are kept for fidelity to the "
                 "papers' AlexNet/VGG16 and train slower.")


PictureForce = Annotated[Optional[bool], typer.Option("--force", help="replace an existing --out picture (it is never overwritten otherwise)", show_default=False)]


@command()
def gallery(
    artifact: Annotated[Path, typer.Argument(help="clusters.h5 from `ssl cluster`, or labels.h5 from `ssl pseudolabel` / `ssl self-train`", metavar="ARTIFACT", show_default=False)],
    data: Annotated[Optional[str], typer.Option("--data", help=f"the images the features came from: {SOURCE_FORMS} [required]", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="picture to write: .png, .pdf or .svg [required]", show_default=False)] = None,
    order: Annotated[str, typer.Option("--order", help="which rows: largest, purest, or mixed (least pure first); purity needs targets")] = "largest",
    clusters: Annotated[int, typer.Option("--clusters", help="number of rows (clusters, or pseudo-labels)")] = 10,
    per_cluster: Annotated[int, typer.Option("--per-cluster", help="images per row")] = 8,
    rank: Annotated[Optional[str], typer.Option("--rank", help="images of a row: distance (nearest the centroid first) or confidence (highest first) [default: distance for clusters.h5, confidence for labels.h5]", show_default=False)] = None,
    thumb_size: Annotated[int, typer.Option("--thumb-size", help="side of each image in pixels")] = 64,
    force: PictureForce = None,
) -> None:
    """Picture of clusters or pseudo-labels: a row each, with size, purity, majority class and best images."""
    from ssl_cli.stages import gallery as stage

    if data is None or out is None:
        raise UserError("--data (the images the features came from) and --out (e.g. gallery.png) are required")
    ui.show_result(stage.run(artifact, data, out, order=order, rows=clusters, per_row=per_cluster, rank=rank,
                             thumb_size=thumb_size, force=bool(force), reporter=ui.RichReporter()))


@command()
def plot(
    metrics_files: Annotated[list[Path], typer.Argument(help="<stem>.metrics.jsonl files written beside checkpoints, one run each", metavar="METRICS_FILE", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="picture to write: .png, .pdf or .svg [required]", show_default=False)] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="legend name of a run, once per file in file order [default: the file's stem]", show_default=False)] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="comma-separated metrics to draw, e.g. loss,accuracy [default: every numeric one]", show_default=False)] = None,
    force: PictureForce = None,
) -> None:
    """Training curves per epoch: one panel per metric (loss, accuracy, lr, ...), one line per run."""
    from ssl_cli.stages import plot as stage

    if out is None:
        raise UserError("--out is required: the picture to write, e.g. --out curves.png")
    chosen = [name.strip() for name in metrics.split(",") if name.strip()] if metrics else None
    ui.show_result(stage.run(metrics_files, out, labels=label, metrics=chosen, force=bool(force),
                             reporter=ui.RichReporter()))


@command("run")
def run_pipeline(
    stages_file: Annotated[Path, typer.Argument(help="stages file", metavar="STAGES_FILE")] = Path("stages.yaml"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, run nothing")] = False,
    until: Annotated[Optional[str], typer.Option("--until", help="stop after this stage")] = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="re-run this stage even if up to date (repeatable)")] = None,
) -> None:
    """Run the stages of a stages.yaml in dependency order, skipping what is up to date."""
    from ssl_cli.pipeline import run as pipeline

    if not dry_run:
        pipeline.claim_run(stages_file)
    rows = pipeline.plan(stages_file, until=until, force=force or [])
    ui.show_plan(rows)
    if not dry_run:
        pipeline.execute(stages_file, until=until, force=force or [], reporter=ui.RichReporter(),
                         on_result=ui.show_result)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
