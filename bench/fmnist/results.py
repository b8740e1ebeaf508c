"""Every Fashion-MNIST result of the tool against the simplest baselines: writes bench/fmnist/RESULTS.md (issue 15).

One resumable benchmark in parts; `--only PART[,PART]` runs some of them, and RESULTS.md is rewritten
from bench/fmnist/results.json after every part (a part not run yet says so). Every `ssl` stage skips
outputs that are up to date, so a stopped part continues where it was and a finished one costs seconds.

  pixels         the raw-pixel baselines every table is read against, computed in this run: kNN (k=20,
                 cosine) and logistic regression from 100 and 500 labels per class and from all 60,000,
                 and k-means (k=10) NMI / ACC / ARI on the test split
  supervised     `ssl train` from scratch with the tool's defaults (bench/fmnist/defaults.py): 100 and
                 500 labels per class and all 60,000 (alexnet_bn_lowres, every other row's arch), and
                 convnet_bn_lowres (the small-image pick)
  methods        every `--task` at one budget (bench/fmnist/contrastive.py's protocol: 8 epochs of the
                 first 20,000 training images, pool5 features, kNN / linear from 100 and 500 labels per
                 class, k-means k=10 on the test split), the untrained net and the pixels
  scan           SCAN's clusters from the MoCo v2 and the context features (bench/fmnist/scan.py: train ->
                 test split), against k-means on the pixels and on the same features
  transfer       knowledge transfer (Noroozi et al. 2018) with DeepCluster, the best method at the
                 clusters this recipe consumes: VGG16-BN on DeepCluster -> its pool5 or conv2 features ->
                 k-means k=100 -> pseudo-labels -> AlexNet-BN, linear probes at every conv layer against
                 AlexNet-BN's own DeepCluster training at the same budget
  self-training  SimCLRv2's recipe: MoCo v2 pre-training -> full finetuning on 100 labels per class
                 (the teacher) -> distillation rounds on 20,000 unlabelled images (`ssl self-train
                 --teacher --soft`), then one round with a student twice as wide, against the labels
                 alone and all labels
  pictures       galleries of the best and the raw-pixel clusters, training curves of the main runs
                 (bench/fmnist/pictures/, embedded in RESULTS.md)

    python bench/fmnist/results.py                        # everything (about 10 hours on 2 shared cores from nothing)
    python bench/fmnist/results.py --only pixels,transfer # some parts
    python bench/fmnist/results.py --only write           # RESULTS.md from results.json, nothing run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from contrastive import METHODS, cluster, knn_top1, linear_top1, read_features, ssl, write_pixels  # noqa: E402
from report import write_markdown  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
TRAIN, TEST = f"fashion-mnist:{FMNIST}:train", f"fashion-mnist:{FMNIST}:test"
PARTS = ("pixels", "supervised", "methods", "scan", "transfer", "self-training", "pictures")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
# every --task of the methods table and the epochs each row runs: 8 x 20,000 images; moco2-long twice that
EPOCHS = {**{method: 8 for method in METHODS if method not in ("untrained", "pixels", "pirl", "moco2-long")},
          "moco2-long": 16}
TRANSFER_METHOD, TRANSFER_K = "deepcluster", 100
# the deep net's layers whose features are clustered into the shallow net's pseudo-labels -> (file prefix, pooling):
# pool5 (the paper's choice: the top of the trunk) and conv2, the layer whose linear probe scored best
CLUSTERED = {"pool5": ("deep", ()), "conv2": ("deep-conv2", ("--pool-size", 3))}
TEACHER_METHOD = "moco2-long"  # the pre-training whose finetuned teacher scored best (see RESULTS.md)
# finetuning at a quarter of the default peak lr keeps more of the pre-training: 0.8347 against 0.8330
TEACHER_LR = 5e-4
ROUNDS = 3
WIDE_STUDENT = 0.5  # the extra round's student width: twice alexnet_bn_lowres's default 0.25, 4x its parameters


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def trained_seconds(metrics: Path) -> float:
    """Training seconds a `.metrics.jsonl` records (every epoch's `seconds`)."""
    return round(sum(json.loads(line).get("seconds", 0.0) for line in metrics.read_text().splitlines()), 1)


def bench(script: str, *args: object) -> float:
    """Run another bench/fmnist script (resumable on its own); its seconds."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / script), *map(str, args)])
    if done.returncode != 0:
        sys.exit(f"failed: {script} {' '.join(map(str, args))}")
    return time.perf_counter() - began


# ---------------------------------------------------------------------------------------------- parts


def part_pixels(runs: Path) -> dict:
    """kNN and logistic regression on the raw pixels (784-d, [0, 1]) with the labels every row uses, and
    k-means on the test pixels: the floor of every table."""
    from ssl_cli.stages.finetune import few_labels

    work = runs / "fmnist-contrastive"
    work.mkdir(parents=True, exist_ok=True)
    train_x, train_y = read_features(write_pixels(work, "train"))
    test_x, test_y = read_features(write_pixels(work, "test"))
    result: dict = {}
    for per_class in (100, 500, None):
        chosen = few_labels(train_y, per_class, 0)
        name = per_class or "all"
        result[f"knn_{name}"] = knn_top1(train_x[chosen], train_y[chosen], test_x, test_y)
        result[f"linear_{name}"] = linear_top1(train_x[chosen], train_y[chosen], test_x, test_y)
    for pca in ("auto", "0"):
        result[f"nmi_pca{pca}"], result[f"acc_pca{pca}"], result[f"ari_pca{pca}"] = cluster(
            work, "pixels-test.h5", "pixels", pca)
    return result


def part_supervised(runs: Path) -> dict:
    bench("defaults.py", "--work", runs / "fmnist-defaults", "--arch", "alexnet_bn_lowres", "--skip", "teacher,rounds")
    bench("defaults.py", "--work", runs / "fmnist-defaults", "--arch", "convnet_bn_lowres", "--skip",
          "teacher,rounds,few500")
    return load(HERE / "defaults.results.json")


def part_methods(runs: Path, redo: bool = False, only: set[str] | None = None) -> dict:
    """The rows of contrastive.results.json that are missing (all of them with `redo`), and the pixels and
    the untrained net again: every `ssl` call of a finished row costs a model load, 18 rows x 5 calls."""
    done = load(HERE / "contrastive.results.json")
    by_epochs: dict[int, list[str]] = {8: ["pixels", "untrained"]}
    for method, epochs in EPOCHS.items():
        if (only is None or method in only) and (redo or f"{method} ({epochs} epochs of 20000)" not in done):
            by_epochs.setdefault(epochs, []).append(method)
    for epochs, methods in sorted(by_epochs.items()):
        bench("contrastive.py", "--work", runs / "fmnist-contrastive", "--epochs", epochs, "--methods", ",".join(methods))
    return load(HERE / "contrastive.results.json")


# checkpoints SCAN starts from and the scan.py rows of each: MoCo v2 (the best start in issue 14) and
# context prediction (the methods table's best features)
SCAN_STARTS = {"moco2": "pixels,features,scan-noself,scan", "context": "features,scan-noself"}


def part_scan(runs: Path) -> dict:
    for name, rows in SCAN_STARTS.items():
        bench("scan.py", "--work", runs / "fmnist-scan", "--model", runs / f"fmnist-contrastive/{name}.pt", "--name",
              name, "--only", rows)
    return load(HERE / "scan.results.json")


def probe(work: Path, model: str, out: str) -> dict:
    """Linear probes at every conv layer from 500 labels per class (`ssl finetune --mode linear`)."""
    ssl(work, "finetune", "--model", model, "--data", TRAIN, "--mode", "linear", "--layers", ",".join(LAYERS),
        "--labels-per-class", 500, "--no-progress", "--out", out)
    report = load(work / out / "metrics.json")
    return {layer: values["top1"] for layer, values in report["layers"].items()}


def part_transfer(runs: Path) -> dict:
    """The deep net, its clusters at each layer of CLUSTERED, the shallow net retrained on each, and every net's
    probes; the shallow net's own training on TRANSFER_METHOD is the reference."""
    work = runs / "fmnist-results"
    prepare(work)
    flags = METHODS[TRANSFER_METHOD]
    deep = f"deep-{TRANSFER_METHOD}.pt"
    ssl(work, "pretext", *flags, "--arch", "vgg16_bn_lowres", "--width", 0.25, "--data", "train.h5", "--epochs", 8, "--monitor-data",
        "monitor.h5", "--monitor-every", 1, "--no-progress", "--out", deep)
    own = str((runs / "fmnist-contrastive" / f"{TRANSFER_METHOD}.pt").resolve())
    result = {"deep": probe(work, deep, "probe-deep"), "own": probe(work, own, "probe-own"), "variants": {}}
    for layer, (prefix, pooling) in CLUSTERED.items():
        ssl(work, "extract", "--model", deep, "--data", "train.h5", "--layer", layer, *pooling, "--no-progress",
            "--out", f"{prefix}-train.h5")
        ssl(work, "cluster", "--features", f"{prefix}-train.h5", "--k", TRANSFER_K, "--seed", 0, "--no-progress",
            "--out", f"{prefix}-clusters.h5")
        ssl(work, "pseudolabel", "--clusters", f"{prefix}-clusters.h5", "--features", f"{prefix}-train.h5",
            "--no-progress", "--out", f"{prefix}-labels.h5")
        student = "transfer-student" if layer == "pool5" else f"transfer-{layer}-student"
        # the same budget as the shallow net's own pretext run: 8 epochs of the 20,000 images
        ssl(work, "retrain", "--labels", f"{prefix}-labels.h5", "--data", "train.h5", "--arch", "alexnet_bn_lowres",
            "--sampling", "uniform", "--epochs", 8, "--batch-size", 128, "--no-progress", "--out", f"{student}.pt")
        with_targets = load_metrics_attr(work / f"{prefix}-clusters.h5")
        result["variants"][layer] = {
            "probes": probe(work, f"{student}.pt", "probe-transfer" if layer == "pool5" else f"probe-transfer-{layer}"),
            "clusters": {key: with_targets.get(key) for key in ("nmi", "acc_majority", "ari")},
            "retrain_seconds": trained_seconds(work / f"{student}.metrics.jsonl")}
    result["seconds"] = {"deep pretext": trained_seconds(work / f"deep-{TRANSFER_METHOD}.metrics.jsonl"),
                         "own pretext": trained_seconds(runs / "fmnist-contrastive" / f"{TRANSFER_METHOD}.metrics.jsonl")}
    result["monitor_knn_top1"] = [round(json.loads(line)["knn_top1"], 4) for line in
                                  (work / f"deep-{TRANSFER_METHOD}.metrics.jsonl").read_text().splitlines()]
    return result


def part_self_training(runs: Path) -> dict:
    work = runs / "fmnist-results"
    prepare(work)
    pretrained = str((runs / "fmnist-contrastive" / f"{TEACHER_METHOD}.pt").resolve())
    teacher = f"teacher-{TEACHER_METHOD}"
    ssl(work, "finetune", "--model", pretrained, "--data", TRAIN, "--mode", "full", "--labels-per-class", 100,
        "--lr", TEACHER_LR, "--no-progress", "--out", teacher)
    out = f"st-{TEACHER_METHOD}"
    ssl(work, "self-train", "--labelled", TRAIN, "--labels-per-class", 100, "--unlabelled", "train.h5", "--teacher",
        f"{teacher}/finetuned.pt", "--rounds", ROUNDS, "--soft", "--no-progress", "--out", out)
    # Noisy Student's growth step: one more round whose student is wider than its teacher (the last student)
    wide = f"{out}-wide"
    ssl(work, "self-train", "--labelled", TRAIN, "--labels-per-class", 100, "--unlabelled", "train.h5", "--teacher",
        f"{out}/round-{ROUNDS}/student.pt", "--rounds", 1, "--student-width", WIDE_STUDENT, "--soft", "--no-progress",
        "--out", wide)
    # the wider student's own labels-alone reference: how much of its gain is the width alone
    ssl(work, "train", "--data", TRAIN, "--arch", "alexnet_bn_lowres", "--width", WIDE_STUDENT, "--labels-per-class",
        100, "--no-progress", "--out", "labels-alone-wide/model.pt")
    rounds = []
    for item in load(work / out / "summary.json")["rounds"]:
        metrics = work / out / f"round-{item['round']}" / "student.metrics.jsonl"
        rounds.append({**item, "train_seconds": trained_seconds(metrics) if metrics.exists() else None})
    last = load(work / wide / "summary.json")["rounds"][-1]
    rounds.append({**last, "round": ROUNDS + 1, "student_width": WIDE_STUDENT,
                   "train_seconds": trained_seconds(work / wide / "round-1" / "student.metrics.jsonl")})
    return {"teacher_top1": load(work / teacher / "metrics.json")["layers"]["logits"]["top1"],
            "teacher_seconds": trained_seconds(work / teacher / "finetuned.metrics.jsonl"),
            "pretrained": TEACHER_METHOD, "rounds": rounds,
            "wide_labels_alone": {"width": WIDE_STUDENT, "top1": load(work / "labels-alone-wide" / "model.eval.json")["top1"],
                                  "train_seconds": trained_seconds(work / "labels-alone-wide" / "model.metrics.jsonl")}}


def part_pictures(runs: Path) -> dict:
    pictures = HERE / "pictures"
    pictures.mkdir(exist_ok=True)
    made = {}

    def picture(name: str, *args: object) -> None:
        ssl(Path.cwd(), *args, "--out", pictures / name, "--force")
        made[name] = str((pictures / name).relative_to(HERE))

    best, label = best_scan(runs)
    made["best clusters"] = label
    picture("gallery-best.png", "gallery", best, "--data", TEST, "--clusters", 10, "--per-cluster", 10,
            "--thumb-size", 32)
    picture("gallery-pixels.png", "gallery", runs / "fmnist-contrastive" / "pixels-clusters-pca0.h5", "--data", TEST,
            "--clusters", 10, "--per-cluster", 10, "--thumb-size", 32)
    contrastive = runs / "fmnist-contrastive"
    curves = ["context", "simclr2", "moco2", "autoencoder", "rotation", "deepcluster", "swav", "jigsaw", "inpainting"]
    present = [m for m in curves if (contrastive / f"{m}.metrics.jsonl").exists()]
    labels = [flag for m in present for flag in ("--label", m)]
    picture("curves-pretext.png", "plot", *[contrastive / f"{m}.metrics.jsonl" for m in present], *labels,
            "--metrics", "knn_top1")
    st = runs / "fmnist-results" / f"st-{TEACHER_METHOD}"
    students = sorted(st.glob("round-*/student.metrics.jsonl"))
    teacher = runs / "fmnist-results" / f"teacher-{TEACHER_METHOD}" / "finetuned.metrics.jsonl"
    few = runs / "fmnist-defaults" / "alexnet_bn_lowres" / "few" / "model.metrics.jsonl"
    runs_ = [(few, "labels alone"), (teacher, f"teacher ({TEACHER_METHOD} finetuned)")] + \
        [(path, f"student {path.parent.name}") for path in students] + \
        [(st.with_name(st.name + "-wide") / "round-1" / "student.metrics.jsonl", f"wider student round-{ROUNDS + 1}")]
    runs_ = [(path, label) for path, label in runs_ if path.exists()]
    picture("curves-self-training.png", "plot", *[path for path, _ in runs_],
            *[flag for _, label in runs_ for flag in ("--label", label)], "--metrics", "loss,accuracy")
    return made


def best_scan(runs: Path) -> tuple[Path, str]:
    """The SCAN clusters of the test split with the highest NMI in scan.results.json, and their row name."""
    rows = {name: row for name, row in load(HERE / "scan.results.json").items() if name.startswith("SCAN")}
    name = max(rows, key=lambda key: rows[key]["nmi"])
    start = name.split(" from ")[1].split(" (")[0]
    lr = name.split("(lr ")[1].split(")")[0] if "self-label (lr" in name else None
    return runs / "fmnist-scan" / (f"{start}-scan-sl{lr}.h5" if lr else f"{start}-scan-noself.h5"), name


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    ssl(work, "pack", "--data", TRAIN, "--limit", 20_000, "--no-progress", "--out", "train.h5")
    ssl(work, "pack", "--data", TEST, "--limit", 2_000, "--no-progress", "--out", "monitor.h5")


def load_metrics_attr(path: Path) -> dict:
    import h5py

    with h5py.File(path) as handle:
        return json.loads(handle.attrs["metrics"])


def machine() -> str:
    import torch

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.machine()}")


RUNNERS = {"pixels": part_pixels, "supervised": part_supervised, "methods": part_methods, "scan": part_scan,
           "transfer": part_transfer, "self-training": part_self_training, "pictures": part_pictures}


def refuse(message: str) -> None:
    """Bad input: one line on stderr, exit 2 (the CLI's convention), nothing run or written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of the work folders (resumable)")
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run: {', '.join(PARTS)}, or write")
    parser.add_argument("--methods", default=None,
                        help="methods: the tasks to run if missing (default: every one); the table shows the rest "
                             "as not measured")
    parser.add_argument("--redo", action="store_true",
                        help="methods: evaluate the finished rows again too (otherwise only the missing ones)")
    args = parser.parse_args()
    parts = [part for part in args.only.split(",") if part != "write"]
    unknown = [part for part in parts if part not in RUNNERS]
    if unknown:
        refuse(f"unknown part {', '.join(unknown)}; valid: {', '.join(PARTS)}, write")
    if parts and not Path(FMNIST, "train-images-idx3-ubyte.gz").exists():
        refuse(f"no Fashion-MNIST in {FMNIST}; run `apt-get install dataset-fashion-mnist`")
    for part in parts:
        print(f"== {part}", flush=True)
        began = time.perf_counter()
        if part == "methods":
            value = part_methods(args.runs, args.redo, set(args.methods.split(",")) if args.methods else None)
        else:
            value = RUNNERS[part](args.runs)
        results = load(args.results)  # re-read: another part may have been written meanwhile
        results[part] = {"value": value, "wall_seconds": round(time.perf_counter() - began, 1),
                         "date": time.strftime("%Y-%m-%d"), "machine": machine()}
        args.results.write_text(json.dumps(results, indent=1))
        write_markdown(args.markdown, results)  # after every part: a stopped run leaves the tables so far
    if not parts:
        write_markdown(args.markdown, load(args.results))
    print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
