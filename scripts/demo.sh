#!/usr/bin/env bash
# From a fresh clone: set up .venv, generate toy images and run the pipeline in stages.yaml,
# then print what each artifact holds. Re-running skips everything that is up to date.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
ssl run stages.yaml
# pictures: the clusters (one row each, the images nearest the centroid) and the training curves
ssl gallery runs/toy/clusters.h5 --data runs/toy/images --per-cluster 8 --out runs/toy/gallery.png --force
ssl plot runs/toy/pretext.metrics.jsonl runs/toy/student.metrics.jsonl runs/toy/self-train/round-*/student.metrics.jsonl \
    --metrics loss,accuracy,lr --out runs/toy/curves.png --force
echo "pictures: runs/toy/gallery.png (clusters) and runs/toy/curves.png (training curves)"
python - <<'PY'
import json, h5py
from rich.console import Console
from rich.table import Table

table = Table(title="toy pipeline: cluster quality against the toy classes", title_justify="left")
paths = ("runs/toy/clusters.h5", "runs/toy/scan-clusters.h5", "runs/toy/labels.h5")
# the artifact column is never cut short: it is as wide as the longest path, the headers wrap instead
table.add_column("artifact", no_wrap=True, min_width=max(map(len, paths)))
for column in ("rows", "k", "NMI", "ARI", "Hungarian acc", "majority acc"):
    table.add_column(column, min_width=min(len(column), 9))
omitted = set()
for path in paths:
    with h5py.File(path) as f:
        metrics = json.loads(f.attrs["metrics"])
        rows = f["assignments" if "assignments" in f else "labels"].shape[0]
        omitted.update([metrics["acc_majority_omitted"]] if "acc_majority_omitted" in metrics else [])
        table.add_row(path, str(rows), str(f.attrs["k"]),
                      *(f"{metrics[key]:.3f}" if key in metrics else "-" for key in ("nmi", "ari", "acc_hungarian", "acc_majority")))
Console().print(table)
for reason in sorted(omitted):
    print(f"majority acc left out: {reason}")

summary = json.load(open("runs/toy/self-train/summary.json"))
rounds = Table(title=f"toy pipeline: self-training ({summary['labelled_images']} labelled images, "
                     f"{summary['unlabelled_images']} unlabelled, {summary['eval_images']} held out)", title_justify="left")
for column in ("round", "role", "teacher top-1", "pseudo-labels", "their accuracy", "top-1"):
    rounds.add_column(column, overflow="fold")
for row in summary["rounds"]:
    pseudo = row["pseudo_accuracy"]
    rounds.add_row(str(row["round"]), row["role"], "-" if row["teacher_top1"] is None else f"{row['teacher_top1']:.3f}",
                   "-" if row["pseudo_labelled"] is None else str(row["pseudo_labelled"]),
                   "-" if pseudo is None else f"{pseudo:.3f}", f"{row['top1']:.3f}")
Console().print(rounds)

report = json.load(open("runs/toy/finetune-linear/metrics.json"))
print(f"toy pipeline: linear probes on the retrained student ({report['train_images']} labelled images, "
      f"{report['eval_images']} held out, chance {1 / report['classes']:.3f})")
probes = Table()
for column in ("layer", "top-1", "top-5"):
    probes.add_column(column)
for layer, scores in report["layers"].items():
    probes.add_row(layer, f"{scores['top1']:.3f}", f"{scores['top5']:.3f}")
Console().print(probes)
print("probes standardise their inputs (finetune --linear-norm): without it, a student without batch norm "
      "(alexnet_lowres) left conv4-5 probes at chance because conv5 varies ~20x less across images than conv1")
PY
