"""The `ssl` command: one thin command per stage. Parse flags, resolve the config, call the stage,
print the result. No logic lives here."""

from __future__ import annotations

import contextvars
import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from ssl_cli import __version__, ui
from ssl_cli.artifacts.lock import claim_output, claim_scope
from ssl_cli.config import (
    ClusterConfig,
    ExtractConfig,
    PackConfig,
    PseudolabelConfig,
    SelfTrainConfig,
    SupervisedConfig,
    ToyDataConfig,
    resolve,
)
from ssl_cli.errors import UserError
from ssl_cli.options import (
    BatchSize,
    ConfigFile,
    Data,
    Deterministic,
    Device,
    Epochs,
    Flip,
    Force,
    LabelSmoothing,
    Lr,
    MinScale,
    Momentum,
    Optimizer,
    Out,
    Progress,
    Schedule,
    Seed,
    Shift,
    WarmupEpochs,
    WeightDecay,
    Width,
    Workers,
    describe,
)

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


def command(name: str | None = None, **kwargs) -> Callable:
    """Register a command whose errors become one line: UserError -> exit 2, anything else -> exit 1.

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

        return app.command(name, **kwargs)(guarded)

    return wrap


def _reporter(cfg) -> ui.RichReporter:
    # Under torchrun only rank 0 draws progress bars; the others would print the same lines again.
    main_rank = os.environ.get("RANK", "0") == "0"
    return ui.RichReporter(enabled=getattr(cfg, "progress", True) and main_rank)


@command("toy-data")
def toy_data(
    out: Annotated[Path, typer.Argument(help="folder to write <class>/<index>.png into")],
    n: Annotated[Optional[int], typer.Option("--n", help="number of images [default: 400]", show_default=False)] = None,
    classes: Annotated[Optional[int], typer.Option("--classes", help="number of classes, 2-84 [default: 4]", show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option("--size", help="image side in pixels [default: 32]", show_default=False)] = None,
    seed: Seed = None,
    force: Force = None,
    config: ConfigFile = None,
) -> None:
    """Write deterministic toy images of C classes (shapes x colours x textures, with noise)."""
    from ssl_cli.stages import toy_data as stage

    cfg = resolve(ToyDataConfig, config, {"out": out, "n": n, "classes": classes, "size": size, "seed": seed})
    ui.show_result(stage.run(cfg, force=bool(force), reporter=ui.RichReporter()))


@command()
def pack(
    data: Data = None,
    out: Out = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help=describe(PackConfig, "image_size"), show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help=describe(PackConfig, "limit"), show_default=False)] = None,
    force: Force = None, progress: Progress = None, config: ConfigFile = None,
) -> None:
    """Pack an image source into one HDF5 store (images uint8 N x H x W x 3, sample_ids, targets)."""
    from ssl_cli.stages import pack as stage

    cfg = resolve(PackConfig, config, {"data": data, "out": out, "image_size": image_size, "limit": limit, "force": force,
                                  "progress": progress})
    ui.show_result(stage.run(cfg, _reporter(cfg)))


@command()
def extract(
    data: Data = None,
    out: Out = None,
    model: Annotated[Optional[Path], typer.Option("--model", help=describe(ExtractConfig, "model"), show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help=describe(ExtractConfig, "arch") + " (`ssl archs` lists them)", show_default=False)] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help=describe(ExtractConfig, "weights"), show_default=False)] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help=describe(ExtractConfig, "layer"), show_default=False)] = None,
    pool: Annotated[Optional[str], typer.Option("--pool", help=describe(ExtractConfig, "pool") + ": avg, max or none", show_default=False)] = None,
    pool_size: Annotated[Optional[int], typer.Option("--pool-size", help=describe(ExtractConfig, "pool_size"), show_default=False)] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help=describe(ExtractConfig, "image_size"), show_default=False)] = None,
    width: Width = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help=describe(ExtractConfig, "dtype") + ": float32 or float16", show_default=False)] = None,
    batch_size: BatchSize = None, seed: Seed = None, device: Device = None, workers: Workers = None,
    force: Force = None, progress: Progress = None, config: ConfigFile = None,
) -> None:
    """Features of one named layer for every image -> features.h5 (resumable, streamed)."""
    from ssl_cli.stages import extract as stage

    cfg = resolve(ExtractConfig, config, {
        "data": data, "out": out, "model": model, "arch": arch, "weights": weights, "layer": layer, "pool": pool,
        "pool_size": pool_size, "image_size": image_size, "width": width, "dtype": dtype, "batch_size": batch_size,
        "seed": seed, "device": device, "workers": workers, "force": force, "progress": progress})
    ui.show_result(stage.run(cfg, _reporter(cfg)))


@command()
def cluster(
    features: Annotated[Optional[Path], typer.Option("--features", help="features.h5 from `ssl extract`", show_default=False)] = None,
    k: Annotated[Optional[int], typer.Option("--k", help=describe(ClusterConfig, "k"), show_default=False)] = None,
    out: Out = None,
    pca_dim: Annotated[Optional[str], typer.Option("--pca-dim", metavar="auto|<int>", help=describe(ClusterConfig, "pca_dim"), show_default=False)] = None,
    pca_sample: Annotated[Optional[int], typer.Option("--pca-sample", help=describe(ClusterConfig, "pca_sample"), show_default=False)] = None,
    niter: Annotated[Optional[int], typer.Option("--niter", help=describe(ClusterConfig, "niter"), show_default=False)] = None,
    max_points_per_centroid: Annotated[Optional[int], typer.Option("--max-points-per-centroid", help=describe(ClusterConfig, "max_points_per_centroid"), show_default=False)] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="faiss, or torch (CPU/CUDA, all-reduce under torchrun) [default: faiss]", show_default=False)] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="faiss on GPUs: auto (all visible), on, off [default: auto]", show_default=False)] = None,
    chunk_rows: Annotated[Optional[int], typer.Option("--chunk-rows", help=describe(ClusterConfig, "chunk_rows"), show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option("--method", help=describe(ClusterConfig, "method"), show_default=False)] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help=describe(ClusterConfig, "model"), show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", help=describe(ClusterConfig, "data"), show_default=False)] = None,
    assign_data: Annotated[Optional[str], typer.Option("--assign-data", help=describe(ClusterConfig, "assign_data"), show_default=False)] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help=describe(ClusterConfig, "layer"), show_default=False)] = None,
    pool_size: Annotated[Optional[int], typer.Option("--pool-size", help=describe(ClusterConfig, "pool_size"), show_default=False)] = None,
    neighbours: Annotated[Optional[Path], typer.Option("--neighbours", help=describe(ClusterConfig, "neighbours"), show_default=False)] = None,
    neighbours_k: Annotated[Optional[int], typer.Option("--neighbours-k", help=describe(ClusterConfig, "neighbours_k"), show_default=False)] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help=describe(ClusterConfig, "heads"), show_default=False)] = None,
    entropy_weight: Annotated[Optional[float], typer.Option("--entropy-weight", help=describe(ClusterConfig, "entropy_weight"), show_default=False)] = None,
    scan_epochs: Annotated[Optional[int], typer.Option("--scan-epochs", help=describe(ClusterConfig, "scan_epochs"), show_default=False)] = None,
    self_label: Annotated[Optional[bool], typer.Option("--self-label/--no-self-label", help=describe(ClusterConfig, "self_label"), show_default=False)] = None,
    self_label_epochs: Annotated[Optional[int], typer.Option("--self-label-epochs", help=describe(ClusterConfig, "self_label_epochs"), show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help=describe(ClusterConfig, "threshold"), show_default=False)] = None,
    self_label_lr: Annotated[Optional[float], typer.Option("--self-label-lr", help=describe(ClusterConfig, "self_label_lr"), show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=describe(ClusterConfig, "batch_size"), show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=describe(ClusterConfig, "lr"), show_default=False)] = None,
    seed: Seed = None, device: Device = None, workers: Workers = None, force: Force = None, progress: Progress = None,
    config: ConfigFile = None,
) -> None:
    """k-means on PCA-whitened, L2-normalised features -> clusters.h5 (+ NMI/ARI/accuracy with targets);
    --method scan: SCAN from a pretext --model and --data images."""
    from ssl_cli.stages import cluster as stage

    cfg = resolve(ClusterConfig, config, {
        "features": features, "k": k, "out": out, "pca_dim": pca_dim, "pca_sample": pca_sample, "niter": niter,
        "max_points_per_centroid": max_points_per_centroid, "backend": backend, "gpu": gpu, "chunk_rows": chunk_rows,
        "method": method, "model": model, "data": data, "assign_data": assign_data, "layer": layer,
        "pool_size": pool_size, "neighbours": neighbours, "neighbours_k": neighbours_k, "heads": heads,
        "entropy_weight": entropy_weight, "scan_epochs": scan_epochs, "self_label": self_label,
        "self_label_epochs": self_label_epochs, "threshold": threshold, "self_label_lr": self_label_lr,
        "batch_size": batch_size, "lr": lr,
        "seed": seed, "device": device, "workers": workers, "force": force, "progress": progress})
    ui.show_result(stage.run(cfg, _reporter(cfg)))


@command()
def pseudolabel(
    clusters: Annotated[Optional[Path], typer.Option("--clusters", help="clusters.h5 from `ssl cluster`", show_default=False)] = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="features.h5 to label (may be another dataset)", show_default=False)] = None,
    out: Out = None,
    chunk_rows: Annotated[Optional[int], typer.Option("--chunk-rows", help=describe(PseudolabelConfig, "chunk_rows"), show_default=False)] = None,
    force: Force = None, progress: Progress = None, config: ConfigFile = None,
) -> None:
    """Nearest centroid (after the clusters' PCA + L2) for every row -> labels.h5 with confidence."""
    from ssl_cli.stages import pseudolabel as stage

    cfg = resolve(PseudolabelConfig, config, {"clusters": clusters, "features": features, "out": out,
                                              "chunk_rows": chunk_rows, "force": force, "progress": progress})
    ui.show_result(stage.run(cfg, _reporter(cfg)))


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


@command()
def pretext(
    task: Annotated[Optional[str], typer.Option("--task", help="handcrafted: jigsaw, jigsawpp, rotation, context, colorization, inpainting; contrastive: simclr, simclr2, moco, moco2, pirl; reconstructive: autoencoder (options: --task-option, listed in the README)", show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="backbone (`ssl archs` lists them)", show_default=False)] = None,
    data: Data = None,
    out: Out = None,
    epochs: Epochs = None,
    lr: Lr = None,
    optimizer: Optimizer = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    warmup_epochs: WarmupEpochs = None,
    schedule: Schedule = None,
    deterministic: Deterministic = None,
    width: Width = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="crop a sample is cut from [default: 225 for jigsaw, else the arch's input size]", show_default=False)] = None,
    permutations: Annotated[Optional[int], typer.Option("--permutations", help="jigsaw: size of the permutation set [1000; jigsawpp 701]", show_default=False)] = None,
    permutation_file: Annotated[Optional[Path], typer.Option("--permutation-file", help="jigsaw: a set written by `ssl permutations` (.json or .npy)", show_default=False)] = None,
    min_hamming: Annotated[Optional[int], typer.Option("--min-hamming", help="jigsaw: required minimum Hamming distance [jigsawpp: 3]", show_default=False)] = None,
    grayscale_prob: Annotated[Optional[float], typer.Option("--grayscale-prob", help="jigsaw: probability of a grey image [0; jigsawpp 0.7]", show_default=False)] = None,
    max_replaced: Annotated[Optional[int], typer.Option("--max-replaced", help="jigsaw: up to this many tiles from another image [0; jigsawpp 2]", show_default=False)] = None,
    tile_size: Annotated[Optional[int], typer.Option("--tile-size", help="jigsaw: tile side [64 for 75-px cells]", show_default=False)] = None,
    task_option: Annotated[Optional[list[str]], typer.Option("--task-option", help="any other task option, KEY=VALUE (repeatable), e.g. temperature=0.5, views=grey", show_default=False)] = None,
    monitor_data: Annotated[Optional[str], typer.Option("--monitor-data", help="labelled images (a source, e.g. fashion-mnist:DIR:test): cosine kNN top-1 (k=20) of the trunk's features, in the metrics and the progress output", show_default=False)] = None,
    monitor_every: Annotated[Optional[int], typer.Option("--monitor-every", help="epochs between kNN measurements (the last epoch is always measured) [default: 1]", show_default=False)] = None,
    batch_size: BatchSize = None, seed: Seed = None, device: Device = None, workers: Workers = None,
    force: Force = None, progress: Progress = None, config: ConfigFile = None,
) -> None:
    """Train a backbone on a pretext task -> pretext.pt (+ .metrics.jsonl); resumes after a kill."""
    from ssl_cli.config import PretextConfig
    from ssl_cli.stages import pretext as stage

    options = _task_options(config, task_option, {
        "permutations": permutations, "permutation_file": str(permutation_file) if permutation_file else None,
        "min_hamming": min_hamming, "grayscale_prob": grayscale_prob, "max_replaced": max_replaced,
        "tile_size": tile_size})
    cfg = resolve(PretextConfig, config, {
        "task": task, "arch": arch, "data": data, "out": out, "epochs": epochs, "lr": lr, "optimizer": optimizer,
        "momentum": momentum, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "schedule": schedule,
        "deterministic": deterministic, "width": width, "image_size": image_size, "task_options": options,
        "monitor_data": monitor_data, "monitor_every": monitor_every, "batch_size": batch_size, "seed": seed, "device": device, "workers": workers, "force": force,
        "progress": progress})
    ui.show_result(stage.run(cfg, _reporter(cfg)))


@command()
def retrain(
    labels: Annotated[Optional[Path], typer.Option("--labels", help="labels.h5 from `ssl pseudolabel` (joined to --data by sample id)", show_default=False)] = None,
    data: Data = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="target architecture, trained from scratch (`ssl archs`)", show_default=False)] = None,
    out: Out = None,
    sampling: Annotated[Optional[str], typer.Option("--sampling", help="natural, or uniform over pseudo-label classes (DeepCluster) [default: natural]", show_default=False)] = None,
    epochs: Epochs = None,
    lr: Lr = None,
    optimizer: Optimizer = None,
    weight_decay: WeightDecay = None,
    warmup_epochs: WarmupEpochs = None,
    deterministic: Deterministic = None,
    width: Width = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="training crop size [default: the arch's input size]", show_default=False)] = None,
    min_scale: MinScale = None,
    shift: Shift = None,
    flip: Flip = None,
    label_smoothing: LabelSmoothing = None,
    schedule: Schedule = None,
    momentum: Momentum = None,
    grayscale_prob: Annotated[Optional[float], typer.Option("--grayscale-prob", help="probability of a grey image [default: 0]", show_default=False)] = None,
    color_jitter: Annotated[Optional[float], typer.Option("--color-jitter", help="colour jitter strength [default: 0]", show_default=False)] = None,
    batch_size: BatchSize = None, seed: Seed = None, device: Device = None, workers: Workers = None,
    force: Force = None, progress: Progress = None, config: ConfigFile = None,
) -> None:
    """Train the target arch on pseudo-labels -> student.pt (knowledge transfer; resumes after a kill)."""
    from ssl_cli.config import RetrainConfig
    from ssl_cli.stages import retrain as stage

    cfg = resolve(RetrainConfig, config, {
        "labels": labels, "data": data, "arch": arch, "out": out, "sampling": sampling, "epochs": epochs, "lr": lr,
        "optimizer": optimizer, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs,
        "deterministic": deterministic, "width": width, "image_size": image_size, "min_scale": min_scale,
        "shift": shift, "flip": flip, "label_smoothing": label_smoothing, "schedule": schedule, "momentum": momentum, "grayscale_prob": grayscale_prob, "color_jitter": color_jitter, "batch_size": batch_size,
        "seed": seed, "device": device, "workers": workers, "force": force, "progress": progress})
    ui.show_result(stage.run(cfg, _reporter(cfg)))


@command("train")
def train_supervised(
    data: Data = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="architecture trained from scratch (`ssl archs`; convnet_bn_lowres for small images)", show_default=False)] = None,
    out: Out = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help=describe(SupervisedConfig, "eval_data"), show_default=False)] = None,
    labels_per_class: Annotated[Optional[int], typer.Option("--labels-per-class", help=describe(SupervisedConfig, "labels_per_class"), show_default=False)] = None,
    width: Width = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help=describe(SupervisedConfig, "dropout"), show_default=False)] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help=describe(SupervisedConfig, "image_size"), show_default=False)] = None,
    min_scale: MinScale = None,
    shift: Shift = None,
    flip: Flip = None,
    label_smoothing: LabelSmoothing = None,
    epochs: Epochs = None,
    lr: Lr = None,
    optimizer: Optimizer = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    warmup_epochs: WarmupEpochs = None,
    schedule: Schedule = None,
    deterministic: Deterministic = None,
    batch_size: BatchSize = None, seed: Seed = None, device: Device = None, workers: Workers = None,
    force: Force = None, progress: Progress = None, config: ConfigFile = None,
) -> None:
    """Train an arch from scratch on labelled images -> model.pt (+ .metrics.jsonl, .eval.json): the supervised baseline."""
    from ssl_cli.stages import train as stage

    cfg = resolve(SupervisedConfig, config, {
        "data": data, "arch": arch, "out": out, "eval_data": eval_data, "labels_per_class": labels_per_class,
        "width": width, "dropout": dropout, "image_size": image_size, "min_scale": min_scale, "shift": shift,
        "flip": flip, "label_smoothing": label_smoothing, "epochs": epochs, "lr": lr, "optimizer": optimizer,
        "momentum": momentum, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "schedule": schedule,
        "deterministic": deterministic, "batch_size": batch_size, "seed": seed, "device": device, "workers": workers,
        "force": force, "progress": progress})
    ui.show_result(stage.run(cfg, _reporter(cfg)))


@command()
def finetune(
    model: Annotated[Optional[Path], typer.Option("--model", help="checkpoint to evaluate", show_default=False)] = None,
    data: Data = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="labelled evaluation images [default: the source's test split]", show_default=False)] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="full, linear or knn [default: linear]", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (metrics.json, finetuned.pt / linear.pt)", show_default=False)] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="comma-separated layers: linear probes them all at once, knn reads the first [default: conv layers / the feature layer]", show_default=False)] = None,
    freeze_through: Annotated[Optional[str], typer.Option("--freeze-through", help="full: keep this layer and the earlier ones fixed", show_default=False)] = None,
    labels_per_class: Annotated[Optional[int], typer.Option("--labels-per-class", help="deterministic subset of N labelled images per class (by --seed)", show_default=False)] = None,
    linear_norm: Annotated[Optional[bool], typer.Option("--linear-norm/--no-linear-norm", help="linear: standardise each pooled value before its classifier, so small-activation layers are probed fairly [default: on]", show_default=False)] = None,
    knn_k: Annotated[Optional[int], typer.Option("--knn-k", help="knn: neighbours that vote [default: 20]", show_default=False)] = None,
    knn_temperature: Annotated[Optional[float], typer.Option("--knn-temperature", help="knn: votes weighted by exp(cos/T) [default: 0.07]", show_default=False)] = None,
    epochs: Epochs = None,
    lr: Lr = None,
    optimizer: Optimizer = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    min_scale: MinScale = None,
    shift: Shift = None,
    flip: Flip = None,
    label_smoothing: LabelSmoothing = None,
    deterministic: Deterministic = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="[default: the checkpoint's input size]", show_default=False)] = None,
    batch_size: BatchSize = None, seed: Seed = None, device: Device = None, workers: Workers = None,
    force: Force = None, progress: Progress = None, config: ConfigFile = None,
) -> None:
    """Evaluate a checkpoint on labelled images: full finetuning, linear probes per layer, or kNN."""
    from ssl_cli.config import FinetuneConfig
    from ssl_cli.stages import finetune as stage

    cfg = resolve(FinetuneConfig, config, {
        "model": model, "data": data, "eval_data": eval_data, "mode": mode, "out": out,
        "layers": layers.split(",") if layers else None, "freeze_through": freeze_through,
        "labels_per_class": labels_per_class, "linear_norm": linear_norm, "knn_k": knn_k,
        "knn_temperature": knn_temperature, "epochs": epochs,
        "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay, "schedule": schedule, "min_scale": min_scale,
        "shift": shift, "flip": flip, "label_smoothing": label_smoothing, "deterministic": deterministic, "image_size": image_size,
        "batch_size": batch_size, "seed": seed, "device": device, "workers": workers, "force": force,
        "progress": progress})
    ui.show_result(stage.run(cfg, _reporter(cfg)))


def _self_train_option(flag: str, field: str, kind: type = str):
    return Annotated[Optional[kind], typer.Option(flag, help=describe(SelfTrainConfig, field), show_default=False)]


@command("self-train")
def self_train(
    labelled: _self_train_option("--labelled", "labelled") = None,
    unlabelled: _self_train_option("--unlabelled", "unlabelled") = None,
    eval_data: _self_train_option("--eval-data", "eval_data") = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder: round-0 .. round-R and summary.json", show_default=False)] = None,
    teacher: _self_train_option("--teacher", "teacher", Path) = None,
    rounds: _self_train_option("--rounds", "rounds", int) = None,
    arch: _self_train_option("--arch", "arch") = None,
    student_arch: _self_train_option("--student-arch", "student_arch") = None,
    width: Width = None,
    student_width: _self_train_option("--student-width", "student_width", float) = None,
    image_size: _self_train_option("--image-size", "image_size", int) = None,
    labels_per_class: _self_train_option("--labels-per-class", "labels_per_class", int) = None,
    threshold: _self_train_option("--threshold", "threshold", float) = None,
    balance: _self_train_option("--balance", "balance", int) = None,
    soft: Annotated[Optional[bool], typer.Option("--soft/--hard", help="learn the teacher's probabilities (soft) or its argmax (hard) [default: hard]", show_default=False)] = None,
    temperature: _self_train_option("--temperature", "temperature", float) = None,
    unlabelled_weight: _self_train_option("--unlabelled-weight", "unlabelled_weight", float) = None,
    unlabelled_ratio: _self_train_option("--unlabelled-ratio", "unlabelled_ratio", int) = None,
    randaugment_ops: _self_train_option("--randaugment-ops", "randaugment_ops", int) = None,
    randaugment_magnitude: _self_train_option("--randaugment-magnitude", "randaugment_magnitude", int) = None,
    dropout: _self_train_option("--dropout", "dropout", float) = None,
    stochastic_depth: _self_train_option("--stochastic-depth", "stochastic_depth", float) = None,
    min_scale: MinScale = None,
    shift: Shift = None,
    flip: Flip = None,
    epochs: Epochs = None,
    lr: Lr = None,
    optimizer: Optimizer = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    warmup_epochs: WarmupEpochs = None,
    schedule: Schedule = None,
    deterministic: Deterministic = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="labelled images per batch; each brings --unlabelled-ratio pseudo-labelled ones [default: 64]", show_default=False)] = None,
    seed: Seed = None, device: Device = None, workers: Workers = None,
    force: Force = None, progress: Progress = None, config: ConfigFile = None,
) -> None:
    """Teacher-student self-training rounds (Noisy Student) -> DIR/round-r/{labels.h5, student.pt, metrics.json}."""
    from ssl_cli.stages import self_train as stage

    cfg = resolve(SelfTrainConfig, config, {
        "labelled": labelled, "unlabelled": unlabelled, "eval_data": eval_data, "out": out, "teacher": teacher,
        "rounds": rounds, "arch": arch, "student_arch": student_arch, "width": width, "student_width": student_width,
        "image_size": image_size, "labels_per_class": labels_per_class, "threshold": threshold, "balance": balance,
        "soft": soft, "temperature": temperature, "unlabelled_weight": unlabelled_weight,
        "unlabelled_ratio": unlabelled_ratio, "randaugment_ops": randaugment_ops,
        "randaugment_magnitude": randaugment_magnitude, "dropout": dropout, "stochastic_depth": stochastic_depth,
        "min_scale": min_scale, "shift": shift, "flip": flip, "epochs": epochs, "lr": lr, "optimizer": optimizer,
        "momentum": momentum,
        "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "schedule": schedule,
        "deterministic": deterministic, "batch_size": batch_size, "seed": seed, "device": device, "workers": workers,
        "force": force, "progress": progress})
    result = stage.run(cfg, _reporter(cfg))
    ui.show_result(result)
    ui.show_table("accuracy per round", stage.round_table(cfg.out))


@command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="an ssl-cli model checkpoint")],
    fmt: Annotated[str, typer.Option("--format", help="torchvision (loads strict into torchvision.models.<arch>) or safetensors")] = "torchvision",
    out: Annotated[Optional[Path], typer.Option("--out", help="output file", show_default=False)] = None,
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
def inspect(path: Annotated[Path, typer.Argument(help="any ssl-cli artifact: .h5 or .pt")]) -> None:
    """Show an artifact's schema, provenance (config, inputs) and datasets."""
    from ssl_cli.stages import inspect as stage

    ui.show_artifact(str(path), stage.run(path))


@command()
def archs() -> None:
    """List the architectures and their named layers."""
    from ssl_cli.models.registry import arch_names, get_arch

    for name in arch_names():
        spec = get_arch(name)
        ui.out.print(f"[bold]{name}[/bold] ({spec.description}; input {spec.input_size}px): {', '.join(spec.layers)}")
    ui.out.print("Small images (28-32 px): convnet_bn_lowres is the best from-scratch net per unit of compute "
                 "(bench/recipes.py: 0.84-0.85 on Fashion-MNIST from 100 labels per class); alexnet_bn_lowres is the "
                 "AlexNet of the knowledge-transfer recipe with batch norm, a point behind; vgg16_bn_lowres and "
                 "resnet18_lowres are the deeper choices. The *_lowres archs without _bn are kept for fidelity to the "
                 "papers' AlexNet/VGG16 and train slower.")


PictureForce = Annotated[Optional[bool], typer.Option("--force", help="replace an existing --out picture (it is never overwritten otherwise)", show_default=False)]


@command()
def gallery(
    artifact: Annotated[Path, typer.Argument(help="clusters.h5 from `ssl cluster`, or labels.h5 from `ssl pseudolabel` / `ssl self-train`")],
    data: Data = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="picture to write: .png, .pdf or .svg", show_default=False)] = None,
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
    metrics_files: Annotated[list[Path], typer.Argument(help="<stem>.metrics.jsonl files written beside checkpoints, one run each", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="picture to write: .png, .pdf or .svg", show_default=False)] = None,
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
    stages_file: Annotated[Path, typer.Argument(help="stages file")] = Path("stages.yaml"),
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
