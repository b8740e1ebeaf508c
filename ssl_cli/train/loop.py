"""The training loop shared by every training stage.

Deterministic seeding; channels_last and bf16 autocast where they were measured to win (CUDA, and CPUs
with native bf16: `device.training_channels_last` / `training_bf16`); torch.compile with `--compile`;
`<out>.partial` written after every epoch, every `checkpoint_seconds` inside one (so kill -9 loses at most that
much), and when SIGINT/SIGTERM arrives (then the process stops); a
re-run resumes from the partial at the exact step, with model, optimizer, RNG and metric history
restored, and ends with the same weights as an uninterrupted run (in deterministic mode).
`<stem>.metrics.jsonl` sits beside the checkpoint. Under torchrun it wraps the model in DDP; rank 0
alone writes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader

from ssl_cli.artifacts.checkpoint import load_checkpoint, save_checkpoint
from ssl_cli.artifacts.h5 import partial_path
from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.outputs import OutputState, plan_output
from ssl_cli.artifacts.schema import Provenance
from ssl_cli.data.batch_augment import step_generator
from ssl_cli.data.dataset import threaded_batches
from ssl_cli.data.resized import unpacked
from ssl_cli.device import resolve_device, training_autocast, training_bf16, training_channels_last
from ssl_cli.errors import UserError
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.train import distributed
from ssl_cli.train.lars import LARS
from ssl_cli.train.lars import param_groups as lars_param_groups
from ssl_cli.train.sampler import EpochSampler
from ssl_cli.train.schedule import learning_rate


TIMED_CHECK_STEPS = 50  # under torchrun, how often the ranks ask whether rank 0's checkpoint time has come


@dataclass(frozen=True)
class TrainOptions:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # sgd | adamw | lars
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    schedule: str = "cosine"  # cosine | onecycle | constant
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    workers: int = 2
    progress: bool = True
    compile: bool = False  # torch.compile the network; the first step's compilation is reported and recorded
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": no code generation, for tests)
    # None: the device's measured choice (device.training_channels_last / training_bf16, bench/README.md)
    channels_last: bool | None = None
    bf16: bool | None = None
    # <out>.partial is also written inside an epoch once this many seconds have passed since the last one
    # (rank 0's clock decides, every rank saves at that step); None: at epoch ends and on SIGINT/SIGTERM only
    checkpoint_seconds: float | None = 600.0


class TrainDataset(Protocol):
    """Items are (inputs, target, index, ok); `set_epoch` reseeds per-sample randomness."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def sample_id(self, index: int) -> str: ...


@dataclass(frozen=True)
class StepContext:
    """Where a step sits in training, for methods that need more than (inputs, targets).

    indices (B,) int64 on the device: the dataset positions of the batch (PIRL's memory bank);
    step counts from 0 over the whole run, so `progress` runs from 0 to 1 (momentum schedules)."""

    indices: torch.Tensor
    epoch: int
    step: int
    total_steps: int
    group: distributed.ProcessGroup

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


Inputs = Any  # a tensor, or a list of tensors (the views of a multi-view method)
# (model, inputs, targets, context) -> (loss, accuracy in [0, 1] or None)
StepFn = Callable[[nn.Module, Inputs, torch.Tensor, StepContext], "tuple[torch.Tensor, float | None]"]
# (inputs on the device, generator seeded by (seed, epoch, step)) -> inputs the step sees
BatchTransform = Callable[[torch.Tensor, torch.Generator], Inputs]
# called after every optimizer step (momentum encoders)
AfterStep = Callable[[StepContext], None]
# (epoch counting from 1, the model) -> extra metrics for that epoch's history row (an online monitor)
EpochEnd = Callable[[int, nn.Module], "dict[str, float]"]
# (epoch counting from 0, the optimizer) -> this epoch's sampling weights, or None for `sample_weights`; runs
# before every epoch, a resumed one included (work between epochs: DeepCluster re-clusters the whole set)
EpochStart = Callable[[int, torch.optim.Optimizer], "torch.Tensor | None"]


DIVERGENCE_FACTOR = 3.0  # a mean loss above this many times the chance loss: the run has diverged
DIVERGENCE_WINDOW = 5  # steps in that mean


class DivergenceCheck:
    """Says when a run has diverged, so it stops with advice instead of training on garbage.

    Two rules: any non-finite loss; and, for a task that knows its chance loss (ln C for a C-way
    classification: the loss of a uniform guess, ln 701 = 6.55 for Jigsaw++), a mean over the last
    DIVERGENCE_WINDOW steps (at least 2) above DIVERGENCE_FACTOR x chance once the warm-up is over. A
    network that has learnt nothing sits at chance; 3x chance means confident wrong answers, which a
    run that learns never reaches on average (a plain VGG16 under AdamW at 2e-3 reached 26x). The
    first step alone never trips it: it scores the initialisation, not the training."""

    def __init__(self, chance_loss: float | None, warmup_steps: int):
        self.limit = DIVERGENCE_FACTOR * chance_loss if chance_loss else None
        self.chance_loss = chance_loss
        self.warmup_steps = warmup_steps
        self.recent: list[float] = []

    def problem(self, loss: float, step: int) -> str | None:
        """The loss of global step `step`; a sentence saying what went wrong, or None."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        if self.limit is None or step < self.warmup_steps:
            return None
        self.recent = (self.recent + [loss])[-DIVERGENCE_WINDOW:]
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) >= 2 and mean > self.limit:
            return (f"the loss is {mean:.4g} (mean of the last {len(self.recent)} steps), over "
                    f"{DIVERGENCE_FACTOR:g} x its chance level {self.chance_loss:.3g}")
        return None


def divergence_message(problem: str, epoch: int, step: int, options: TrainOptions, out: Path) -> str:
    """`epoch` counts from 0, so it is also the number of epochs the partial checkpoint holds."""
    kept = (f"{partial_path(out)} keeps the last checkpoint, after epoch {epoch}" if partial_path(out).exists()
            else "no checkpoint was written")
    return (f"training diverged at epoch {epoch + 1}, step {step}: {problem}; lower --lr (it was "
            f"{options.lr:g} with {options.optimizer}), or use --optimizer sgd --lr 0.01 --momentum 0.9 (the papers' "
            f"recipe for networks without batch norm), or add --warmup-epochs 1 --schedule cosine ({kept}; "
            f"{out} was not written)")


@dataclass
class TrainResult:
    out: Path
    status: str
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def metrics_path(out: Path) -> Path:
    return out.with_name(out.stem + ".metrics.jsonl")


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@contextmanager
def stop_on_signal() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set an event instead of killing; the loop checkpoints and stops at the next step."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """The optimizer of `options` over the model's trainable parameters. A model with `optimizer_groups()`
    (parameter groups, each {"params": [...], "lr_scale": s}) gets those groups: each follows the schedule at
    s x its learning rate (SCAN's network under its heads)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if hasattr(model, "optimizer_groups") and options.optimizer != "lars":
        params = model.optimizer_groups()
    if options.optimizer == "lars":  # biases and norm parameters: no weight decay, no trust ratio (SimCLR)
        return LARS(lars_param_groups(model, options.weight_decay), lr=options.lr, momentum=options.momentum)
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    raise UserError(f"unknown optimizer {options.optimizer!r}; use sgd, adamw or lars")


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@claim_scope()  # `out` stays locked at least until the final checkpoint is renamed into place
def train(model: nn.Module, dataset: TrainDataset, step: StepFn, options: TrainOptions, out: Path,
          provenance: Provenance, final_payload: Callable[[nn.Module], dict[str, Any]], force: bool = False,
          reporter: Reporter | None = None, sample_weights: torch.Tensor | None = None,
          batch_transform: BatchTransform | None = None, after_step: AfterStep | None = None,
          epoch_end: EpochEnd | None = None, epoch_start: EpochStart | None = None,
          chance_loss: float | None = None) -> TrainResult:
    """Train `model` on `dataset`; write `out` (via `final_payload(model)`) when all epochs are done.

    `batch_transform` (batched augmentation on the device) gets a generator seeded by the step, so a
    resumed run replays it exactly. `after_step` runs after every optimizer step; `epoch_end` adds
    metrics to an epoch's history row; `epoch_start` runs before every epoch (a resumed one too) and
    may replace its sampling weights. Whatever a method keeps between steps (a momentum encoder, a
    queue, a memory bank, cluster labels) must be parameters or buffers of `model`: then the
    checkpoint holds it and a resumed run continues exactly. `chance_loss` (the loss of a network that
    has learnt nothing) lets `DivergenceCheck` stop a diverged run with a UserError; `out` is then not
    written and `<out>.partial` keeps the last finished epoch."""
    reporter = reporter or SilentReporter()
    plan = plan_output(out, provenance.fingerprint, force)
    if plan.up_to_date:
        reporter.info(f"{out} is up to date; skipped")
        return TrainResult(out, plan.state.value)
    device = resolve_device(options.device)
    group = distributed.setup(device.type)
    if device.type == "cuda" and group.active:
        device = torch.device("cuda", group.local_rank)
    seed_everything(options.seed, options.deterministic)
    model = model.to(device)
    channels_last = training_channels_last(device) if options.channels_last is None else options.channels_last
    bf16 = training_bf16(device) if options.bf16 is None else options.bf16
    if channels_last:  # 4-d weights only; a step's inputs follow the weights' layout
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, options)
    per_rank = -(-len(dataset) // group.world)
    steps_per_epoch = per_rank // options.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {options.batch_size} is larger than the {per_rank} images per process; "
                        "lower --batch-size")
    state = {"epoch": 0, "step": 0, "history": [], "skipped": [], "sums": None}
    if plan.state is OutputState.RESUME:
        state = resume_from(partial_path(out), model, optimizer, device)
        reporter.info(f"resuming {out} at epoch {state['epoch'] + 1}, step {state['step']}")
    if group.active:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, unsynced_buffers(model))
    trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if group.active else model
    if options.compile:  # compiles at the first step; `model` (uncompiled, same parameters) is what is saved
        trained = torch.compile(trained, backend=options.compile_backend)
    compile_seconds: float | None = None

    total_steps = options.epochs * steps_per_epoch
    warmup_steps = int(round(options.warmup_epochs * steps_per_epoch))
    divergence = DivergenceCheck(chance_loss, warmup_steps if options.schedule != "onecycle" else 0)
    history: list[dict[str, Any]] = state["history"]
    skipped: set[str] = set(state["skipped"])
    if group.is_main:
        write_metrics(out, history)

    def save(epoch: int, step_in_epoch: int, sums: torch.Tensor | None = None) -> None:
        """`sums` carries the running loss/accuracy of a half-done epoch, so its metrics stay whole."""
        if group.is_main:
            save_checkpoint(partial_path(out), provenance, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "step": step_in_epoch, "rng": rng_state(device), "history": history, "skipped": sorted(skipped),
                "sums": sums.cpu() if sums is not None else None})
        distributed.barrier(group)

    saved_at = time.monotonic()
    with stop_on_signal() as stop:
        for epoch in range(state["epoch"], options.epochs):
            start_step = state["step"] if epoch == state["epoch"] else 0
            dataset.set_epoch(epoch)
            weights = epoch_start(epoch, optimizer) if epoch_start is not None else None
            sampler = EpochSampler(len(dataset), options.seed, epoch, group.rank, group.world,
                                   start=start_step * options.batch_size,
                                   weights=weights if weights is not None else sample_weights)
            loader = epoch_loader(dataset, sampler, options, device)
            # loss*n, correct, n, n with accuracy: float64 Python sums (no tensor made and added on the device a step)
            sums = [0.0, 0.0, 0.0, 0.0]
            if start_step and state["sums"] is not None:
                sums = [float(value) for value in state["sums"].tolist()]
            began = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # stays if the partial was saved after the epoch's last step
            trained.train()
            with reporter.progress(f"epoch {epoch + 1}/{options.epochs}", total=steps_per_epoch * options.batch_size,
                                   completed=start_step * options.batch_size) as advance:
                for batch_index, (inputs, targets, indices, ok) in enumerate(loader, start=start_step):
                    lr = learning_rate(epoch * steps_per_epoch + batch_index, total_steps, warmup_steps, options.lr,
                                       options.schedule)
                    for param_group in optimizer.param_groups:
                        param_group["lr"] = lr * param_group.get("lr_scale", 1.0)
                    inputs = to_device(inputs, device)
                    targets = targets.to(device, non_blocking=True)
                    if batch_transform is not None:
                        inputs = batch_transform(inputs, step_generator(options.seed + group.rank, epoch, batch_index,
                                                                        device))
                    context = StepContext(indices.to(device), epoch, epoch * steps_per_epoch + batch_index, total_steps,
                                          group)
                    first_compiled = options.compile and compile_seconds is None
                    if first_compiled:
                        compile_began = time.perf_counter()
                    with training_autocast(device, bf16):
                        loss, accuracy = step(trained, inputs, targets, context)
                    loss_value = loss.item()
                    problem = divergence.problem(loss_value, context.step)
                    diverged = problem is not None
                    if group.active:  # every rank stops at this step (one all-reduce more a step, only under torchrun)
                        diverged = distributed.any_rank(diverged, group, device)
                    if diverged:
                        raise UserError(divergence_message(problem or "the loss diverged on another rank", epoch,
                                                           batch_index, options, out))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if after_step is not None:
                        after_step(context)
                    if first_compiled:  # the first step compiles forward and backward
                        compile_seconds = time.perf_counter() - compile_began
                        reporter.info(f"torch.compile: the first step took {compile_seconds:.1f} s (compilation)")
                    n = len(targets)
                    sums[0] += loss_value * n
                    sums[1] += (accuracy or 0.0) * n
                    sums[2] += n
                    sums[3] += n if accuracy is not None else 0
                    if not bool(torch.as_tensor(ok).all()):  # one check a batch; ids only for replaced images
                        skipped.update(dataset.sample_id(int(i)) for i, good in zip(indices, ok) if not good)
                    advance(n)
                    if distributed.any_rank(stop.is_set(), group, device):
                        save(epoch, batch_index + 1, torch.tensor(sums, dtype=torch.float64))
                        raise KeyboardInterrupt
                    due = options.checkpoint_seconds is not None \
                        and time.monotonic() - saved_at >= options.checkpoint_seconds
                    if group.active:  # rank 0's clock decides, asked every TIMED_CHECK_STEPS steps (one all-reduce)
                        due = (batch_index + 1) % TIMED_CHECK_STEPS == 0 \
                            and distributed.any_rank(due and group.is_main, group, device)
                    if due:
                        save(epoch, batch_index + 1, torch.tensor(sums, dtype=torch.float64))
                        saved_at = time.monotonic()
            seconds = time.perf_counter() - began
            totals = torch.tensor(sums, dtype=torch.float64, device=device)
            distributed.all_reduce_sum(totals, group)
            loss_sum, correct, count, count_acc = totals.tolist()
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(count, 1),
                            "accuracy": correct / count_acc if count_acc else None, "lr": lr,
                            "images_per_second": count / max(seconds, 1e-9), "seconds": seconds})
            if options.compile and epoch == state["epoch"] and compile_seconds is not None:
                history[-1]["compile_seconds"] = compile_seconds  # inside this epoch's seconds
            extra = epoch_end(epoch + 1, model) if epoch_end is not None else {}
            history[-1].update(extra)
            reporter.info(f"epoch {epoch + 1}: loss {history[-1]['loss']:.4f}"
                          + (f", accuracy {history[-1]['accuracy']:.3f}" if count_acc else "")
                          + "".join(f", {key} {value:.3f}" for key, value in extra.items())
                          + f", {history[-1]['images_per_second']:.0f} img/s")
            save(epoch + 1, 0)
            saved_at = time.monotonic()
            if group.is_main:
                write_metrics(out, history)
    if group.is_main:
        payload = final_payload(model)
        payload.setdefault("meta", {})["history"] = history
        payload["meta"]["skipped_ids"] = sorted(skipped)
        save_checkpoint(out, provenance, payload)
        partial_path(out).unlink(missing_ok=True)
    distributed.barrier(group)
    distributed.teardown(group)
    if skipped:
        reporter.warn(f"{len(skipped)} unreadable image(s) were replaced during training, e.g. {sorted(skipped)[:3]}")
    return TrainResult(out, "resumed" if plan.state is OutputState.RESUME else "written", history, sorted(skipped))


PREFETCH_BATCHES = 4  # batches each worker keeps ready: streamed reads vary (page cache or disk)


def epoch_loader(dataset: TrainDataset, sampler: EpochSampler, options: TrainOptions,
                 device: torch.device) -> Iterator:
    """The batches of one epoch, [inputs, targets, positions, ok] each, in the sampler's order.

    A dataset held in memory (`in_memory`) is indexed in this process (worker processes would only add
    copies). One that streams (images beyond the memory budget) from a packed store (`read_in_threads`) is
    read a batch per call by `options.workers` threads (`threaded_batches`: copies out of the file release
    the GIL); from a folder, decoded by `options.workers` DataLoader processes, each batch sent back as one
    block of shared memory (`ResizedImages.collate`, `PackedBatch`). Each keeps PREFETCH_BATCHES batches
    ready per worker; pinned memory on CUDA."""
    if getattr(dataset, "read_in_threads", False):
        pin = device.type == "cuda"
        return threaded_batches(lambda positions: [t.pin_memory() if pin else t for t in dataset.batch(positions)],
                                BatchSampler(sampler, options.batch_size, drop_last=True), options.workers,
                                PREFETCH_BATCHES * max(1, options.workers))
    workers = 0 if getattr(dataset, "in_memory", False) else options.workers
    return unpacked(DataLoader(dataset, batch_size=options.batch_size, sampler=sampler, drop_last=True,
                               num_workers=workers, collate_fn=getattr(dataset, "collate", None),
                               pin_memory=device.type == "cuda", prefetch_factor=PREFETCH_BATCHES if workers else None,
                               generator=torch.Generator().manual_seed(options.seed)))


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """A tensor, or a list/tuple of tensors (several views), moved to `device`."""
    if isinstance(inputs, (list, tuple)):
        return [item.to(device, non_blocking=True) for item in inputs]
    return inputs.to(device, non_blocking=True)


def resume_from(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    data = load_checkpoint(path, map_location=device)
    model.load_state_dict(data["model"])
    optimizer.load_state_dict(data["optimizer"])
    restore_rng(data["rng"], device)
    return {"epoch": int(data["epoch"]), "step": int(data["step"]), "history": list(data["history"]),
            "skipped": list(data["skipped"]), "sums": data.get("sums")}


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite the whole file from the history, so a resumed run never duplicates an epoch."""
    path = metrics_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, path)


def unsynced_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers DDP need not broadcast from rank 0 at every forward: those a module lists in its
    `same_on_every_rank` attribute (a clustering head's labels, made identical on every rank by the labelling)."""
    return [f"{name}.{buffer}" if name else buffer for name, module in model.named_modules()
            for buffer in getattr(module, "same_on_every_rank", ())]

