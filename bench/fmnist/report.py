"""bench/fmnist/results.json -> RESULTS.md: the tables of bench/fmnist/results.py, each read against the
raw-pixel baselines of the same run, and the issue-15 goals as met or missed from the numbers."""

from __future__ import annotations

import time
from pathlib import Path

LABELS = (100, 500)
PROBES = [f"{kind}_{n}" for n in LABELS for kind in ("knn", "linear")]
CLUSTERS = ("nmi", "acc", "ari")
FAMILIES = {  # the methods table's order
    "handcrafted": ("rotation", "jigsaw", "jigsawpp", "context", "colorization", "inpainting"),
    "contrastive": ("simclr", "simclr2", "moco", "moco2", "moco2-long", "pirl-infonce"),
    "reconstructive": ("autoencoder",),
    "clustering": ("deepcluster", "sela", "swav"),
}
PUBLISHED = [("DEC (Xie et al. 2016)", 0.651, 0.618, 0.494), ("N2D (McConville et al. 2019)", 0.684, 0.672, None)]
PICTURES = [("gallery-best.png", "The best clusters of the test split ({best}): a row per cluster, its size, "
             "purity and majority class, its most confident images (red: not the majority class)"),
            ("gallery-pixels.png", "k-means on the raw test pixels (no PCA), the same layout"),
            ("curves-pretext.png", "pretext training: the online kNN top-1 (k=20 on 2,000 test images) per epoch; the losses of different tasks are not comparable"),
            ("curves-self-training.png", "supervised and self-training runs at 100 labels per class: loss and "
             "training accuracy per epoch")]


def f3(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def part(results: dict, name: str) -> dict | None:
    return results.get(name, {}).get("value")


def wall(results: dict, name: str) -> str:
    entry = results.get(name)
    # the last sitting's wall time: stages finished in earlier sittings are skipped, so training times are in the tables
    return (f"last run {entry['wall_seconds'] / 60:.1f} min on {entry['date']} (finished stages skipped; the tables give "
            "each row's training time)" if entry else "not run yet")


def method_name(key: str) -> str:
    return key.split(" (")[0]


def methods_rows(methods: dict) -> list[tuple[str, str, dict]]:
    """(family, key, row) in FAMILIES order, then anything else the results hold."""
    order = {name: (i, j, family) for i, (family, names) in enumerate(FAMILIES.items()) for j, name in enumerate(names)}
    rows = [(order.get(method_name(key), (len(FAMILIES), 0, "other")), key, row) for key, row in methods.items()
            if method_name(key) not in ("pixels", "untrained")]
    return [(rank[2], key, row) for rank, key, row in sorted(rows, key=lambda item: item[0][:2])]


def above(row: dict, pixels: dict) -> int:
    """How many of the 7 measures (4 probes, NMI/ACC/ARI with the default PCA) beat the raw pixels."""
    keys = PROBES + [f"{m}_pcaauto" for m in CLUSTERS]
    return sum(row.get(key, 0) > pixels.get(key, 1) for key in keys)


def section_methods(results: dict, pixels: dict | None) -> list[str]:
    methods = part(results, "methods")
    lines = ["## Every method at one budget", "", f"Part `methods`: {wall(results, 'methods')}.", ""]
    if not methods:
        return lines + ["Not run yet: `python bench/fmnist/results.py --only methods`.", ""]
    lines += ["Protocol (bench/fmnist/contrastive.py): alexnet_bn_lowres (width 0.25) at 28 px, pre-trained on the first "
              "20,000 training images for 8 epochs (160,000 images seen; moco2-long twice that), features = pool5 "
              "pooled to 2x2 (256-d). kNN: k=20 cosine, votes exp(cos/0.07). Linear: logistic regression (L-BFGS) on "
              "standardised features. The labelled images are the same for every row (100 or 500 per class, seed 0); "
              "scores are test top-1 on 10,000 images. k-means: k=10 on the test features with the tool's default "
              "PCA (auto) and without PCA. **Bold**: above the raw pixels of this run. The last column counts the "
              "measures (of the 7 with the default PCA) above the pixels.", "",
              "| family | features | kNN 100 | linear 100 | kNN 500 | linear 500 | NMI | ACC | ARI | NMI / ACC / ARI "
              "(no PCA) | pre-training | above pixels |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = pixels or methods.get("pixels", {})

    def cells(row: dict) -> list[str]:
        out = []
        for key in PROBES + [f"{m}_pcaauto" for m in CLUSTERS]:
            text = f3(row.get(key))
            out.append(f"**{text}**" if row is not base and row.get(key, 0) > base.get(key, 1) else text)
        out.append(" / ".join(f3(row.get(f"{m}_pca0")) for m in CLUSTERS))
        return out

    if base:
        lines.append("| baseline | **raw pixels (784-d)** | " + " | ".join(cells(base)) + " | - | - |")
    if "untrained" in methods:
        row = methods["untrained"]
        lines.append("| baseline | untrained net | " + " | ".join(cells(row)) + f" | - | {above(row, base)}/7 |")
    for family, key, row in methods_rows(methods):
        seconds = row.get("train_seconds")
        minutes = f"{seconds / 60:.0f} min" if seconds else "-"
        lines.append(f"| {family} | {key} | " + " | ".join(cells(row)) + f" | {minutes} | {above(row, base)}/7 |")
    measured = {method_name(key) for key in methods}
    missing = [name for names in FAMILIES.values() for name in names if name not in measured]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (`python bench/fmnist/results.py --only methods` "
                  "runs them; each takes 15-30 min on 2 shared cores)."]
    return lines + [""]


def section_supervised(results: dict, pixels: dict | None) -> list[str]:
    supervised = part(results, "supervised")
    lines = ["## Supervised references", "", f"Part `supervised`: {wall(results, 'supervised')}.", "",
             "Trained from scratch by `ssl train` with the tool's defaults (no tuning flag: bench/fmnist/defaults.py), "
             "scored on the 10,000 test images. The pixel rows use the same labelled images.", "",
             "| model | 100 per class | 500 per class | all 60,000 | training time (100 / 500 / all) |",
             "|---|---|---|---|---|"]
    if pixels:
        lines.append(f"| raw pixels, logistic regression | {f3(pixels['linear_100'])} | {f3(pixels['linear_500'])} | "
                     f"{f3(pixels['linear_all'])} | - |")
        lines.append(f"| raw pixels, kNN (k=20, cosine) | {f3(pixels['knn_100'])} | {f3(pixels['knn_500'])} | "
                     f"{f3(pixels['knn_all'])} | - |")
    for arch, rows in (supervised or {}).items():
        def pick(prefix: str) -> dict:
            return next((row for name, row in rows.items() if name.startswith(prefix)), {})

        few, more, every = pick("labels alone (ssl train, 100"), pick("labels alone (ssl train, 500"), pick("all 60,000")
        times = " / ".join(f"{row['train_seconds'] / 60:.0f} min" if row else "-" for row in (few, more, every))
        lines.append(f"| `ssl train --arch {arch}` | {f3(few.get('top1'))} | {f3(more.get('top1'))} | "
                     f"{f3(every.get('top1'))} | {times} |")
    if not supervised:
        lines.append("| (not run yet: `--only supervised`) | | | | |")
    return lines + [""]


def section_scan(results: dict) -> list[str]:
    scan = part(results, "scan")
    lines = ["## Clusters: SCAN against k-means", "", f"Part `scan`: {wall(results, 'scan')}.", ""]
    if not scan:
        return lines + ["Not run yet: `--only scan`.", ""]
    lines += ["SCAN's protocol (bench/fmnist/scan.py): clusters are learned on training images (the first 20,000 for "
              "network features, all 60,000 for the pixel rows) and scored on the 10,000 test images, k = 10.", "",
              "| clusters (train -> test) | NMI | ACC | ARI | wall |", "|---|---|---|---|---|"]
    for name, row in scan.items():
        lines.append(f"| {name} | {f3(row['nmi'])} | {f3(row['acc'])} | {f3(row['ari'])} | {row['seconds']:.0f} s |")
    lines += ["", "Published (all 70,000 images clustered together, a different protocol): "
              + "; ".join(f"{name} NMI {n} / ACC {a}" + (f" / ARI {r}" if r else "") for name, n, a, r in PUBLISHED)
              + ".", ""]
    return lines


def section_transfer(results: dict, pixels: dict | None) -> list[str]:
    transfer = part(results, "transfer")
    lines = ["## Knowledge transfer (Noroozi et al. 2018) with DeepCluster", "",
             f"Part `transfer`: {wall(results, 'transfer')}.", ""]
    if not transfer:
        return lines + ["Not run yet: `--only transfer`.", ""]
    seconds = transfer["seconds"]
    variants = transfer["variants"]  # {clustered layer: {"probes", "clusters", "retrain_seconds"}}
    lines += ["The deep net (vgg16_bn_lowres at width 0.25: 13 conv layers of 16-128 channels) learns DeepCluster (k=100 over-clustering) on the 20,000 images "
              "for 8 epochs; its features at a layer are clustered by `ssl cluster --k 100` (pool5, the top of its "
              "trunk, as in the paper, and conv2, its best layer by linear probe, average-pooled to 3x3); `ssl "
              "pseudolabel` gives every image its cluster id; the shallow net (alexnet_bn_lowres) is trained on them by "
              "`ssl retrain` for the same 8 epochs of 20,000 images its own DeepCluster run saw. Linear probes "
              "(`ssl finetune --mode linear`, 500 labels per class, test top-1) read every conv layer.", "",
              "The k=100 clusters against the classes: "
              + "; ".join(f"{layer} NMI {f3(v['clusters'].get('nmi'))}, majority-vote accuracy "
                          f"{f3(v['clusters'].get('acc_majority'))}" for layer, v in variants.items())
              + f". Training time: deep pretext {seconds['deep pretext'] / 60:.0f} min, the shallow net's retraining "
              + ", ".join(f"{(v['retrain_seconds'] or 0) / 60:.0f} min ({layer})" for layer, v in variants.items())
              + f", its own pretext {seconds['own pretext'] / 60:.0f} min.", "",
              "| layer | deep net (VGG16-BN, DeepCluster) | shallow net, its own DeepCluster | "
              + " | ".join(f"transfer from {layer} clusters | - own" for layer in variants) + " |",
              "|---|---|---|" + "---|---|" * len(variants)]
    for layer in transfer["own"]:
        own = transfer["own"][layer]
        cells = []
        for variant in variants.values():
            moved = variant["probes"][layer]
            cells += ["**" + f3(moved) + "**" if moved > own else f3(moved), f"{100 * (moved - own):+.1f}"]
        lines.append(f"| {layer} | {f3(transfer['deep'].get(layer))} | {f3(own)} | {' | '.join(cells)} |")
    if pixels:
        base = f3(pixels["linear_500"])
        lines.append(f"| raw pixels (logistic regression, same 500 labels) | {base} | {base} | "
                     + " | ".join(f"{base} | " for _ in variants) + " |")
    return lines + [""]


def section_self_training(results: dict, pixels: dict | None) -> list[str]:
    st = part(results, "self-training")
    supervised = part(results, "supervised") or {}
    lines = ["## Self-training, SimCLRv2's recipe: pre-train -> finetune on 100 labels per class -> distil", "",
             f"Part `self-training`: {wall(results, 'self-training')}.", ""]
    if not st:
        return lines + ["Not run yet: `--only self-training`.", ""]
    alex = supervised.get("alexnet_bn_lowres", {})
    alone = next((row for name, row in alex.items() if name.startswith("labels alone (ssl train, 100")), {})
    every = next((row for name, row in alex.items() if name.startswith("all 60,000")), {})
    lines += [f"The teacher is the {st['pretrained']} checkpoint of the methods table finetuned end to end "
              "(`ssl finetune --mode full`) on the 100 labels per class; each round, `ssl self-train --soft` "
              "trains a student of the same arch (alexnet_bn_lowres) from scratch on the labelled images plus the "
              "teacher's probabilities on 20,000 unlabelled training images, with the tool's default noise "
              "(RandAugment, dropout); the student teaches the next round. A last round trains a wider student "
              "(Noisy Student's growth step).", "",
              "| model (alexnet_bn_lowres unless named) | test top-1 | training time |", "|---|---|---|"]
    if pixels:
        lines += [f"| raw pixels, logistic regression (100 per class) | {f3(pixels['linear_100'])} | - |",
                  f"| raw pixels, kNN (100 per class) | {f3(pixels['knn_100'])} | - |"]
    lines.append(f"| labels alone (`ssl train`, 100 per class) | {f3(alone.get('top1'))} | "
                 f"{alone.get('train_seconds', 0) / 60:.0f} min |")
    lines.append(f"| teacher: {st['pretrained']} finetuned on the 100 per class | {f3(st['teacher_top1'])} | "
                 f"{st['teacher_seconds'] / 60:.0f} min (+ pre-training) |")
    for item in st["rounds"][1:]:
        wider = f", width {item['student_width']} (the teacher's x2)" if "student_width" in item else ""
        lines.append(f"| round {item['round']} student{wider} ({item['pseudo_labelled']} soft pseudo-labels, "
                     f"{f3(item['pseudo_accuracy'])} of their argmax right) | {f3(item['top1'])} | "
                     f"{(item['train_seconds'] or 0) / 60:.0f} min |")
    wide = st.get("wide_labels_alone")
    if wide:
        lines.append(f"| labels alone at the wider student's width {wide['width']} (`ssl train --width "
                     f"{wide['width']}`, 100 per class) | {f3(wide['top1'])} | {wide['train_seconds'] / 60:.0f} min |")
    lines.append(f"| all 60,000 labels (`ssl train`) | {f3(every.get('top1'))} | "
                 f"{every.get('train_seconds', 0) / 60:.0f} min |")
    return lines + [""]


def best_of(methods: dict, key: str) -> tuple[str, float]:
    rows = [(name, row[key]) for name, row in methods.items() if name not in ("pixels",) and key in row]
    return max(rows, key=lambda item: item[1]) if rows else ("-", float("nan"))


def section_headline(results: dict, pixels: dict | None) -> list[str]:
    methods = part(results, "methods") or {}
    scan = part(results, "scan") or {}
    lines = ["## Headline: the best of the tool per measure against the raw pixels", "",
             "| measure | raw pixels | best of the tool | method | DEC | N2D |", "|---|---|---|---|---|---|"]
    if not pixels:
        return lines + ["| (the `pixels` part has not run yet) | | | | | |", ""]
    for key, label in (("knn_100", "kNN top-1, 100 labels per class"), ("knn_500", "kNN top-1, 500 per class"),
                       ("linear_100", "linear top-1, 100 per class"), ("linear_500", "linear top-1, 500 per class")):
        name, value = best_of(methods, key)
        lines.append(f"| {label} | {f3(pixels[key])} | {f3(value)} | {name} | | |")
    scan_rows = {name: row for name, row in scan.items() if not name.startswith("pixels")}
    for index, measure in enumerate(CLUSTERS):
        pixel = max(pixels[f"{measure}_pcaauto"], pixels[f"{measure}_pca0"])
        candidates = [(f"{name} (k-means, test split)", row[f"{measure}_pca{pca}"]) for name, row in methods.items()
                      if name != "pixels" for pca in ("auto", "0") if f"{measure}_pca{pca}" in row]
        candidates += [(f"{name} (train -> test)", row[measure]) for name, row in scan_rows.items()]
        name, value = max(candidates, key=lambda item: item[1]) if candidates else ("-", float("nan"))
        published = [f3(p[1 + index]) if p[1 + index] is not None else "-" for p in PUBLISHED]
        lines.append(f"| k-means / clusters {measure.upper()} (k=10) | {f3(pixel)} | {f3(value)} | {name} | "
                     + " | ".join(published) + " |")
    st = part(results, "self-training")
    if st:
        best = max(st["rounds"][1:] or [{"top1": st["teacher_top1"], "round": 0}], key=lambda item: item["top1"])
        lines.append(f"| classifier top-1, 100 labels per class | {f3(pixels['linear_100'])} | {f3(best['top1'])} | "
                     f"self-training round {best['round']} from {st['pretrained']} | | |")
    return lines + ["", "The pixel cluster figures are the better of with and without PCA; DEC and N2D cluster all "
                    "70,000 images (train and test together), a different protocol.", ""]


def goals(results: dict) -> list[str]:
    lines = ["## The issue's goals", ""]
    supervised = part(results, "supervised") or {}
    every = [row["top1"] for rows in supervised.values() for name, row in rows.items() if name.startswith("all 60,000")]
    few = {arch: row["top1"] for arch, rows in supervised.items() for name, row in rows.items()
           if name.startswith("labels alone (ssl train, 100")}
    if every:
        lines.append(f"- Supervised reference with all labels at least 0.92: best {max(every):.4f}, "
                     + ("met." if max(every) >= 0.92 else "missed."))
    if few:
        lines.append("- Supervised reference at 100 labels per class at least 0.84: "
                     + ", ".join(f"{arch} {top1:.4f}" for arch, top1 in few.items()) + ", "
                     + ("met by " + ", ".join(a for a, t in few.items() if t >= 0.84) if max(few.values()) >= 0.84
                        else "missed") + " (alexnet_bn_lowres is the arch of every other row).")
    transfer = part(results, "transfer")
    if transfer:
        judged = []
        for clustered, variant in transfer["variants"].items():
            wins = [layer for layer in transfer["own"] if variant["probes"][layer] > transfer["own"][layer]]
            judged.append((len(wins) == len(transfer["own"]),
                           f"from {clustered} clusters ahead at {len(wins)} of {len(transfer['own'])} "
                           f"({', '.join(wins) or 'none'})"))
        # met when one variant is ahead everywhere: picking the better variant per layer would not be one recipe
        lines.append("- Transfer beats the shallow net's own training at every layer: "
                     + "; ".join(text for _, text in judged) + ", " + ("met." if any(ok for ok, _ in judged) else "missed."))
    st = part(results, "self-training")
    alex = supervised.get("alexnet_bn_lowres", {})
    alone = next((row["top1"] for name, row in alex.items() if name.startswith("labels alone (ssl train, 100")), None)
    if st and alone is not None:
        teacher = st["teacher_top1"]
        lines.append(f"- The finetuned teacher beats the labels alone at 100 per class: {teacher:.4f} against "
                     f"{alone:.4f}, " + ("met" if teacher > alone else "missed")
                     + f" ({100 * (teacher - alone):+.1f} points).")
        students = [item["top1"] for item in st["rounds"][1:]]
        if students:
            gain = max(students) - teacher
            best = max(st["rounds"][1:], key=lambda item: item["top1"])
            wide = st.get("wide_labels_alone")
            control = (f" (the labels alone at its width {wide['width']}: {wide['top1']:.4f})"
                       if wide and "student_width" in best else "")
            lines.append(f"- Self-training adds at least 3 points over its teacher (near 0.88): best student "
                         f"{max(students):.4f}, round {best['round']}{control}, {100 * gain:+.1f} points, "
                         + ("met." if gain >= 0.03 else "missed."))
    return lines + [""]


def write_markdown(path: Path, results: dict) -> None:
    pixels = part(results, "pixels")
    machines = sorted({entry["machine"] for entry in results.values()})
    total = sum(entry["wall_seconds"] for entry in results.values())
    lines = ["# Fashion-MNIST results", "",
             f"Written by `python bench/fmnist/results.py` (last part run {max((e['date'] for e in results.values()), default='-')}, "
             f"rewritten {time.strftime('%Y-%m-%d')}). Machine: {'; '.join(machines) or '-'}. Wall time of the parts "
             f"as last run: {total / 60:.0f} min (a part whose stages were already done costs seconds; the training "
             "time of each row is in its table). Every part resumes where it stopped: `--only PART`.", "",
             *section_headline(results, pixels), *goals(results), *section_supervised(results, pixels),
             *section_methods(results, pixels), *section_scan(results), *section_transfer(results, pixels),
             *section_self_training(results, pixels)]
    pictures = part(results, "pictures") or {}
    lines += ["## Pictures", "", f"Part `pictures`: {wall(results, 'pictures')}.", ""]
    for name, caption in PICTURES:
        if name in pictures:
            caption = caption.format(best=pictures.get("best clusters", "SCAN"))
            lines += [f"{caption}:", "", f"![{name}]({pictures[name]})", ""]
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    path.write_text("\n".join(lines))
