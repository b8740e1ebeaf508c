"""Every training command and every pretext task: the tool's images/s against a bare step, in one run (issue 24).

For each row this runs the stage's real code path in-process (`stages.<name>.run(cfg)` on `ssl pack`ed
toy images, 32 px) and reads the loop's images/s for the epochs after the first (the first carries the
start-up: building the task, the loader, a compile); then, on the very objects that stage handed the
training loop (captured by wrapping `train`), a bare step:

  bare   a plain `for` loop over one batch already on the device: the batched augmentation the stage
         uses (if any), the step (forward + the method's loss), backward, the optimizer step and the
         method's after-step hook (momentum encoders); the network in the loop's memory format and
         precision (device.training_channels_last / training_bf16). No loader, no per-step bookkeeping,
         no checkpoint: what is left between the two is the tool's overhead (for the handcrafted tasks
         still built per image in DataLoader workers, that building too).
  tool   the loop's own images/s (the same batch size, input size and augmentation).

Images count what the network sees: two views are two images (a multi-crop batch counts every crop; a
self-training batch counts labelled and pseudo-labelled images). FLOPs per image (forward + backward)
come from `torch.utils.flop_counter.FlopCounterMode` on one bare step; `flop_fraction` is the tool's
FLOP/s as a fraction of a 2048^3 float32 matmul's FLOP/s measured in the same run (bf16 steps can pass
1.0). Rows and the GEMM take turns, repeated; medians are reported (the machine is shared and noisy).

    python bench/speed.py                            # every row (~25 min on 2 busy cores)
    python bench/speed.py --quick                    # fewer steps, 1 repeat (~8 min)
    python bench/speed.py --only train,simclr        # a subset (names: `--list`)
    python bench/speed.py --batch-size 64 --json /tmp/speed64.json

Results: bench/speed.results.json (`--json`) and the markdown table printed at the end (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ssl_cli.config import (ClusterConfig, ExtractConfig, FinetuneConfig, PackConfig, PretextConfig, PseudolabelConfig,
                            RetrainConfig, SelfTrainConfig, SupervisedConfig)
from ssl_cli.data.batch_augment import step_generator
from ssl_cli.data.toy import write_toy_folder
from ssl_cli.device import resolve_device, training_autocast, training_bf16, training_channels_last
from ssl_cli.pretext.base import TaskBatch
from ssl_cli.stages import cluster, extract, finetune, pack, pretext, pseudolabel, retrain, self_train
from ssl_cli.stages import train as train_stage
from ssl_cli.train import distributed
from ssl_cli.train import loop
from ssl_cli.train.loop import StepContext, make_optimizer, to_device

RESULTS = Path(__file__).with_name("speed.results.json")
ARCH, WIDTH = "alexnet_bn_lowres", 0.25
STAGE_MODULES = (train_stage, pretext, retrain, finetune, self_train)
TASKS = ["jigsaw", "jigsawpp", "rotation", "context", "colorization", "inpainting", "simclr", "simclr2", "moco",
         "moco2", "pirl", "deepcluster", "sela", "swav", "autoencoder"]
# jigsaw cuts 3 x 3 tiles: from a 48 px crop in 15 px tiles, as the Fashion-MNIST methods table
# (bench/fmnist/contrastive.py) trains it; context's patches likewise need room
TASK_SETTINGS: dict[str, dict[str, Any]] = {"jigsaw": {"image_size": 48, "task_options": {"tile_size": 15}},
                                            "jigsawpp": {"image_size": 48, "task_options": {"tile_size": 15}}}


@dataclass
class Captured:
    """What a stage handed `loop.train` (the last call: self-train's student), and what it returned."""

    args: dict[str, Any] = field(default_factory=dict)
    result: Any = None


@contextmanager
def capture_train() -> Iterator[Captured]:
    captured = Captured()
    real = loop.train

    def wrapper(model, dataset, step, options, out, provenance, final_payload, **kwargs):
        captured.args = dict(model=model, dataset=dataset, step=step, options=options, **kwargs)
        captured.result = real(model, dataset, step, options, out, provenance, final_payload, **kwargs)
        return captured.result

    saved = [(module, module.train) for module in STAGE_MODULES]
    for module, _ in saved:
        module.train = wrapper
    try:
        yield captured
    finally:
        for module, original in saved:
            module.train = original


def images_in(inputs: Any) -> int:
    """Images the network sees in `inputs`: the leading sizes of its tensors, summed over views."""
    if isinstance(inputs, TaskBatch):
        return images_in(inputs.inputs)
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, (list, tuple)):
        return sum(images_in(item) for item in inputs)
    raise TypeError(f"cannot count images in {type(inputs)}")


@dataclass
class Bare:
    """A bare step on the objects one stage run handed the loop."""

    args: dict[str, Any]

    def __post_init__(self) -> None:
        options = self.args["options"]
        self.device = resolve_device(options.device)
        self.bf16 = training_bf16(self.device) if options.bf16 is None else options.bf16
        self.model = self.args["model"].to(self.device)
        if training_channels_last(self.device) if options.channels_last is None else options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = make_optimizer(self.model, options)
        loader = DataLoader(self.args["dataset"], batch_size=options.batch_size, shuffle=False, num_workers=0)
        inputs, targets, indices, _ = next(iter(loader))
        self.inputs, self.targets = to_device(inputs, self.device), targets.to(self.device)
        self.indices = indices.to(self.device)
        self.seed, self.step_index = options.seed, 0
        self.images_per_sample = images_in(self.transformed()) / len(self.targets)

    def transformed(self) -> Any:
        transform = self.args.get("batch_transform")
        if transform is None:
            return self.inputs
        return transform(self.inputs, step_generator(self.seed, 0, self.step_index, self.device))

    def context(self) -> StepContext:
        return StepContext(self.indices, 0, self.step_index, 10**6, distributed.ProcessGroup())

    def forward_backward(self) -> torch.Tensor:
        inputs, context = self.transformed(), self.context()
        with training_autocast(self.device, self.bf16):
            loss, _ = self.args["step"](self.model, inputs, self.targets, context)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def one_step(self) -> None:
        self.forward_backward()
        self.optimizer.step()
        after_step = self.args.get("after_step")
        if after_step is not None:
            after_step(self.context())
        self.step_index += 1

    def images_per_second(self, steps: int) -> float:
        for _ in range(2):
            self.one_step()
        synchronise(self.device)
        began = time.perf_counter()
        for _ in range(steps):
            self.one_step()
        synchronise(self.device)
        return steps * len(self.targets) * self.images_per_sample / (time.perf_counter() - began)

    def flops_per_image(self) -> float:
        with FlopCounterMode(display=False) as counter:
            self.forward_backward()
        return counter.get_total_flops() / (len(self.targets) * self.images_per_sample)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_flops(device: torch.device, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a float32 size^3 matmul on `device` (the best of `repeats`)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronise(device)
        began = time.perf_counter()
        a @ b
        synchronise(device)
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


@dataclass
class Setup:
    """The packed toy images and the upstream artifacts (teacher checkpoint, pseudo-labels) rows need."""

    work: Path
    args: argparse.Namespace
    images: Path = Path()
    teacher: Path = Path()
    labels: Path = Path()

    def common(self) -> dict[str, Any]:
        return dict(batch_size=self.args.batch_size, epochs=self.args.epochs, workers=self.args.workers,
                    device=self.args.device, progress=False, force=True)

    def prepare(self, needs: set[str]) -> None:
        n = self.args.batch_size * self.args.steps
        write_toy_folder(self.work / "toy", n=n, classes=10, size=32, seed=0)
        self.images = self.work / "images.h5"
        pack.run(PackConfig(data=str(self.work / "toy"), out=self.images, progress=False))
        if needs & {"teacher", "labels"}:
            self.teacher = self.work / "teacher.pt"
            train_stage.run(SupervisedConfig(data=str(self.images), arch=ARCH, width=WIDTH, out=self.teacher,
                                             **(self.common() | {"epochs": 1})))
        if "labels" in needs:
            features = self.work / "features.h5"
            extract.run(ExtractConfig(data=str(self.images), model=self.teacher, out=features, progress=False,
                                      device=self.args.device))
            clusters = self.work / "clusters.h5"
            cluster.run(ClusterConfig(features=features, k=10, out=clusters, pca_dim=0, progress=False))
            self.labels = self.work / "labels.h5"
            pseudolabel.run(PseudolabelConfig(clusters=clusters, features=features, out=self.labels, progress=False))


@dataclass(frozen=True)
class Row:
    key: str  # the --only name
    name: str  # the table's
    needs: frozenset[str]
    run: Callable[[Setup, Path], Any]
    images_per_sample: float | None = None  # None: counted from the step's inputs (`images_in`)


def rows() -> list[Row]:
    def supervised(arch: str, width: float | None) -> Callable[[Setup, Path], Any]:
        return lambda s, out: train_stage.run(SupervisedConfig(data=str(s.images), arch=arch, width=width, out=out,
                                                               **s.common()))

    def finetuned(mode: str) -> Callable[[Setup, Path], Any]:
        return lambda s, out: finetune.run(FinetuneConfig(model=s.teacher, data=str(s.images), eval_data=str(s.images),
                                                          mode=mode, out=out, **s.common()))

    def pretexted(task: str) -> Callable[[Setup, Path], Any]:
        settings = TASK_SETTINGS.get(task, {})
        return lambda s, out: pretext.run(PretextConfig(task=task, arch=ARCH, width=WIDTH, data=str(s.images), out=out,
                                                        **settings, **s.common()))

    table = [
        Row("train", f"ssl train {ARCH} w{WIDTH}", frozenset(), supervised(ARCH, WIDTH)),
        Row("train-convnet", "ssl train convnet_bn_lowres", frozenset(), supervised("convnet_bn_lowres", None)),
        Row("retrain", f"ssl retrain {ARCH} w{WIDTH}", frozenset({"labels"}), lambda s, out: retrain.run(RetrainConfig(
            labels=s.labels, data=str(s.images), arch=ARCH, width=WIDTH, out=out, **s.common()))),
        Row("finetune-full", "ssl finetune --mode full", frozenset({"teacher"}), finetuned("full")),
        Row("finetune-linear", "ssl finetune --mode linear", frozenset({"teacher"}), finetuned("linear")),
        Row("self-train", "ssl self-train (round 1 student, RandAugment 2x5)", frozenset({"teacher"}),
            lambda s, out: self_train.run(SelfTrainConfig(out=out, labelled=str(s.images), unlabelled=str(s.images),
                                                          eval_data=str(s.images), teacher=s.teacher, rounds=1,
                                                          **s.common())),
            images_per_sample=2.0),  # (B, 1 + r, ...) groups: a labelled and r = 1 pseudo-labelled image each
    ]
    return table + [Row(task, f"ssl pretext --task {task}", frozenset(), pretexted(task)) for task in TASKS]


def tool_rate(result: Any, images_per_sample: float) -> float:
    """The loop's images/s over the epochs after the first (median), in images the network sees."""
    history = result.history[1:] or result.history
    return statistics.median(row["images_per_second"] for row in history) * images_per_sample


def measure(row: Row, setup: Setup, steps: int) -> dict[str, float]:
    out = setup.work / "runs" / row.key / ("out" if row.key == "self-train" else "out.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    with capture_train() as captured:
        row.run(setup, out)
    bare = Bare(captured.args)
    if row.images_per_sample is not None:
        bare.images_per_sample = row.images_per_sample
    return {"tool": tool_rate(captured.result, bare.images_per_sample), "bare": bare.images_per_second(steps),
            "images_per_sample": bare.images_per_sample, "flops_per_image": bare.flops_per_image()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(report: dict[str, Any]) -> str:
    lines = ["| row | FLOP/image (fwd+bwd) | tool img/s | bare img/s | tool / bare | tool FLOP fraction | "
             "bare FLOP fraction |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['name']} | {row['flops_per_image'] / 1e6:.1f} M | {row['tool_images_per_second']:,.0f} | "
                     f"{row['bare_images_per_second']:,.0f} | {row['ratio']:.2f} | {row['flop_fraction']:.2f} | "
                     f"{row['bare_flop_fraction']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 steps an epoch, 1 repeat")
    parser.add_argument("--only", help="comma-separated row names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the row names and stop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="steps an epoch (and timed bare steps)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs a tool run trains; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where the results go (default {RESULTS})")
    args = parser.parse_args()
    table = rows()
    if args.list:
        print("\n".join(f"{row.key:<16} {row.name}" for row in table))
        return
    if args.quick:
        args.steps, args.repeats, args.epochs = 8, 1, 2
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {row.key for row in table})
        if unknown:
            parser.error(f"unknown row(s) {unknown}; use --list")
        table = [row for row in table if row.key in wanted]
    device = resolve_device(args.device)
    figures: dict[str, list[dict[str, float]]] = {row.key: [] for row in table}
    gemm: list[float] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(Path(tmp), args)
        setup.prepare(set().union(*(row.needs for row in table)))
        for repeat in range(args.repeats):
            gemm.append(gemm_flops(device))
            order = table if repeat % 2 == 0 else table[::-1]  # no row always runs first or last
            for row in order:
                figure = measure(row, setup, args.steps)
                figures[row.key].append(figure)
                print(f"repeat {repeat + 1} {row.key:<16} tool {figure['tool']:8.1f}  bare {figure['bare']:8.1f} img/s  "
                      f"({figure['tool'] / figure['bare']:.2f})", flush=True)
            report = summarise(table, figures, gemm, device, args, started, repeat + 1)
    print(f"\n{report['device']}, torch {torch.__version__} ({report['torch_threads']} threads), GEMM "
          f"{report['gemm_flops_per_second'] / 1e9:.1f} GFLOP/s, batch {args.batch_size}, medians of {args.repeats}\n")
    print(markdown(report))


def summarise(table: list[Row], figures: dict[str, list[dict[str, float]]], gemm: list[float], device: torch.device,
              args: argparse.Namespace, started: float, repeats: int) -> dict[str, Any]:
    """The report over the repeats done so far, written to --json (after every repeat)."""
    peak = statistics.median(gemm)
    report_rows = []
    for row in table:
        tool = statistics.median(f["tool"] for f in figures[row.key])
        bare = statistics.median(f["bare"] for f in figures[row.key])
        flops = figures[row.key][0]["flops_per_image"]
        report_rows.append({
            "name": row.name, "key": row.key, "tool_images_per_second": tool, "bare_images_per_second": bare,
            "ratio": statistics.median(f["tool"] / f["bare"] for f in figures[row.key]),
            "flop_fraction": tool * flops / peak, "bare_flop_fraction": bare * flops / peak, "flops_per_image": flops,
            "images_per_sample": figures[row.key][0]["images_per_sample"],
            "ratios": [f["tool"] / f["bare"] for f in figures[row.key]]})
    report = {
        "rows": report_rows, "gemm_flops_per_second": peak, "gemm": "2048^3 float32 matmul, median of repeats",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)"),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit(),
        "channels_last": training_channels_last(device), "bf16": training_bf16(device),
        "batch_size": args.batch_size, "steps": args.steps, "epochs": args.epochs, "repeats": repeats,
        "workers": args.workers, "arch": f"{ARCH} width {WIDTH} (train-convnet: convnet_bn_lowres)",
        "load_average_at_start": os.getloadavg()[0], "minutes": (time.time() - started) / 60,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    if args.json:
        previous = json.loads(args.json.read_text()) if args.json.exists() and args.only else {}
        if previous.get("rows"):  # --only refreshes its rows and keeps the others
            kept = [r for r in previous["rows"] if r.get("key") not in {row.key for row in table}]
            report["rows"] = kept + report_rows
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    report["rows"] = report_rows
    return report


if __name__ == "__main__":
    main()
