"""The knowledge-transfer chain at ImageNet's row count: every stage at N = 80k, 320k and 1,281,167 (issue 25).

For each N, in `--work`/n<N>/, the chain runs stage by stage, each `ssl` command in its own process under
`/usr/bin/time -v` (wall seconds and peak RSS of that process alone), and each output's bytes are counted:

  toy-data     `ssl toy-data images.h5 --n N`: 32 px toy images straight into an images store (84 classes)
  extract      `ssl extract` of a random-init alexnet_bn_lowres (width 0.25) at pool5, pooled 2 x 2: 256-d
  cluster      `ssl cluster --k 2000 --pca-dim 256` (faiss, 20 iterations, 256 points per centroid)
  pseudolabel  `ssl pseudolabel` of every row with those clusters
  retrain      `ssl retrain --sampling uniform --epochs 1`: one epoch (N draws) of alexnet_bn_lowres on the
               2000 pseudo-labels, the images streamed from the store (they pass the in-memory budget at 320k)
  mine         SCAN's neighbour mining (`ssl_cli.clustering.neighbours.mine_neighbours`, k = 20, method
               auto: exact below its threshold, a faiss index above it), on the L2-normalised features

Beside each stage, a bare step measured in the same run, in its own process under the same `time -v`:

  toy-data     the drawing alone (`draw_toy_image` in a loop, one process): images/s x the workers used
  extract      the network's forward pass on 20k images already in memory as float32 (channels_last): images/s
  cluster      bare faiss doing the stage's job, a process of its own: features.h5 read into one (N, 256) float32
               array, faiss.PCAMatrix(256, 256, eigen_power=-0.5) fitted on 100k sampled rows and applied,
               normalize_L2, `faiss.Kmeans(256, 2000, niter=20, max_points_per_centroid=256).train` and one
               `index.search` of every row; target: the stage's process within 1.1x of this one's wall time.
               (Its `train_search_seconds` is k-means and assignment alone, beside it.)
  pseudolabel  a process that reads features.h5, applies the clusters' PCA and L2 (numpy) and searches every row
               against the centroids with a bare faiss IndexFlatL2
  retrain      a bare training step on one uint8 batch in memory: the stage's batched augmentation, forward, loss,
               backward, AdamW, in the loop's memory format and precision: images/s
  mine         exact mining of a 20k sample (the N^2 method; its seconds x (N / 20k)^2 is the exact cost at N)

Targets (issue 25): seconds grow at most 1.2x faster than N between the smallest and largest N; peak RSS of
extract, pseudolabel and retrain flat in N; cluster within 1.1x of bare faiss and its peak RSS <= 1.5x the
features' bytes (N x 256 float32).

`--kill STAGE...` then runs each named stage again into n<N>-killed/, kills it with SIGKILL half-way (`--kill-at`),
re-runs the same command and compares its output with the chain's: identical, as an uninterrupted run.

Resumable: a stage whose output is complete and whose figures are recorded is not run again (`--again STAGE`
re-measures it; a rerun of a killed `ssl` stage resumes it, as every stage does). Results are written after
every stage to bench/scale.results.json; `--table` prints the markdown table of bench/README.md.

    python bench/scale.py --rows 80000 320000 1281167          # ~1.5 h on 2 quiet cores, most of it at 1.28M
    python bench/scale.py --rows 20000 --work /tmp/scale --json /tmp/scale.json   # a quick look (~3 min)
    python bench/scale.py --table
    python bench/scale.py --rows 1281167 --kill toy-data extract    # kill -9 half-way, re-run: identical output?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("scale.results.json")
STAGES = ("toy-data", "extract", "cluster", "pseudolabel", "retrain", "mine")
STREAMING = ("extract", "pseudolabel", "retrain")
ARCH, WIDTH, SIZE, CLASSES = "alexnet_bn_lowres", 0.25, 32, 84
K, PCA_DIM, NITER, POINTS_PER_CENTROID, NEIGHBOURS = 2000, 256, 20, 256, 20
PCA_SAMPLE = 100_000  # rows the PCA is fitted on (`ssl cluster --pca-sample`'s default)
SAMPLE = 20_000  # rows of the bare extract step and of the exact mining baseline
OUTPUTS = {"toy-data": "images.h5", "extract": "features.h5", "cluster": "clusters.h5", "pseudolabel": "labels.h5",
           "retrain": "retrain.pt", "mine": "neighbours.h5"}


def ssl_command(stage: str, folder: Path, n: int) -> list[str]:
    """The `ssl` command line of `stage` for the chain in `folder` (python -m ssl_cli, --no-progress)."""
    out = folder / OUTPUTS[stage]
    images, features, clusters = folder / "images.h5", folder / "features.h5", folder / "clusters.h5"
    if stage == "toy-data":
        return ["toy-data", str(out), "--n", str(n), "--classes", str(CLASSES), "--size", str(SIZE)]
    if stage == "extract":
        return ["extract", "--data", str(images), "--arch", ARCH, "--width", str(WIDTH), "--layer", "pool5",
                "--pool-size", "2", "--batch-size", "256", "--out", str(out), "--no-progress"]
    if stage == "cluster":
        return ["cluster", "--features", str(features), "--k", str(K), "--pca-dim", str(PCA_DIM), "--niter",
                str(NITER), "--max-points-per-centroid", str(POINTS_PER_CENTROID), "--out", str(out), "--no-progress"]
    if stage == "pseudolabel":
        return ["pseudolabel", "--clusters", str(clusters), "--features", str(features), "--out", str(out),
                "--no-progress"]
    if stage == "retrain":
        return ["retrain", "--labels", str(folder / "labels.h5"), "--data", str(images), "--arch", ARCH, "--width",
                str(WIDTH), "--sampling", "uniform", "--epochs", "1", "--batch-size", "256", "--out", str(out),
                "--no-progress"]
    raise ValueError(stage)


def timed_process(argv: list[str], log: Path) -> dict[str, float]:
    """Run argv under /usr/bin/time -v; {seconds, peak_rss_bytes}. The process's output goes to `log`.

    A shell starts the command, so the child's ru_maxrss is its own, not this process's high-water mark."""
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(argv)}\n")
        sink.flush()
        done = subprocess.run(["/usr/bin/time", "-v", *argv], stdout=sink, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, check=False)
    report = done.stderr
    with log.open("a") as sink:
        sink.write(report)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(argv)}; see {log}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", report)
    hours, minutes, seconds = (float(wall.group(i) or 0) for i in (1, 2, 3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1)) * 1024
    return {"seconds": hours * 3600 + minutes * 60 + seconds, "peak_rss_bytes": rss}


def output_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


# -- bare steps: `python bench/scale.py --bare STAGE FOLDER N` in a child process -----------------------------------


def bare(stage: str, folder: Path, n: int) -> dict[str, Any]:
    """One stage's bare step on the chain's files in `folder`; figures as a dict (printed as JSON by the child).

    Each imports only what its step needs (torch alone is ~700 MB of RSS and 2 s of start)."""
    import numpy as np

    if stage == "toy-data":
        from ssl_cli.data.toy import draw_toy_image, toy_labels

        count = 2000
        labels = toy_labels(count, CLASSES, 0)
        began = time.perf_counter()
        for index in range(count):
            draw_toy_image(index, int(labels[index]), CLASSES, SIZE, 0)
        per_process = count / (time.perf_counter() - began)
        return {"images_per_second_one_process": per_process, "images_per_second": per_process * (os.cpu_count() or 1)}
    if stage == "extract":
        import h5py
        import torch

        from ssl_cli.models.layers import LayerReader
        from ssl_cli.models.registry import build_model, get_arch

        with h5py.File(folder / "images.h5", "r") as store:
            pixels = torch.from_numpy(store["images"][: min(SAMPLE, n)]).permute(0, 3, 1, 2)
        images = pixels.float().div_(255.0).contiguous(memory_format=torch.channels_last)  # the layout the stage feeds
        torch.manual_seed(0)
        reader = LayerReader(build_model(ARCH, width=WIDTH).eval(), get_arch(ARCH), "pool5", "avg", 2)
        with torch.inference_mode():
            reader(images[:256])
            began = time.perf_counter()
            for start in range(0, len(images), 256):
                reader(images[start : start + 256])
            return {"images_per_second": len(images) / (time.perf_counter() - began)}
    if stage in ("cluster", "pseudolabel"):
        import faiss

        began = time.perf_counter()
        if stage == "cluster":
            x = raw_features(folder)
            loaded = time.perf_counter()
            # the stage's preprocessing with faiss's own PCA: whitened (eigen power -0.5), fitted on a seeded
            # sample of PCA_SAMPLE rows, then L2 (DeepCluster's recipe, as `ssl cluster --pca-dim 256` does it)
            pca = faiss.PCAMatrix(x.shape[1], PCA_DIM, -0.5)
            sample = np.random.default_rng(0).choice(len(x), min(PCA_SAMPLE, len(x)), replace=False)
            pca.train(np.ascontiguousarray(x[np.sort(sample)]))
            x = pca.apply(x)
            faiss.normalize_L2(x)
            reduced = time.perf_counter()
            kmeans = faiss.Kmeans(x.shape[1], K, niter=NITER, seed=0, max_points_per_centroid=POINTS_PER_CENTROID)
            kmeans.train(x)
            kmeans.index.search(x, 1)
            return {"load_seconds": loaded - began, "pca_l2_seconds": reduced - loaded,
                    "train_search_seconds": time.perf_counter() - reduced}
        x = reduced_features(folder)
        loaded = time.perf_counter()
        import h5py

        with h5py.File(folder / "clusters.h5", "r") as clusters:
            centroids = np.ascontiguousarray(clusters["centroids"][...], dtype=np.float32)
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        began = time.perf_counter()
        index.search(x, 1)
        return {"load_seconds": loaded - began, "search_seconds": time.perf_counter() - loaded}
    if stage == "retrain":
        import torch

        from ssl_cli.config import RetrainConfig
        from ssl_cli.data.batch_augment import step_generator
        from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from ssl_cli.device import training_autocast, training_bf16, training_channels_last
        from ssl_cli.models.registry import build_model
        from ssl_cli.train.recipe import batch_augment, with_arch_recipe

        torch.manual_seed(0)
        cpu = torch.device("cpu")  # the layout, precision and batched augmentation the stage's loop uses
        layout = torch.channels_last if training_channels_last(cpu) else torch.contiguous_format
        model = build_model(ARCH, num_classes=K, width=WIDTH).train().to(memory_format=layout)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = with_arch_recipe(RetrainConfig(labels=folder / "labels.h5", data=str(folder / "images.h5"), arch=ARCH,
                                             width=WIDTH, sampling="uniform", epochs=1, batch_size=256,
                                             out=folder / "bare.pt"))
        augment = batch_augment(cfg, SIZE, IMAGENET_MEAN, IMAGENET_STD)
        pixels = torch.randint(0, 256, (256, 3, SIZE, SIZE), dtype=torch.uint8)
        labels = torch.randint(0, K, (256,))
        steps = 30
        for step in range(steps + 3):  # three warm-up steps
            if step == 3:
                began = time.perf_counter()
            images = augment(pixels, step_generator(0, 0, step, cpu)).contiguous(memory_format=layout)
            with training_autocast(cpu, training_bf16(cpu)):
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {"images_per_second": steps * 256 / (time.perf_counter() - began)}
    if stage == "mine":
        import torch

        from ssl_cli.clustering.neighbours import mine_neighbours

        x = torch.from_numpy(raw_features(folder, min(SAMPLE, n)))
        began = time.perf_counter()
        mine_neighbours(x, NEIGHBOURS, method="exact")
        seconds = time.perf_counter() - began
        return {"sample": len(x), "seconds": seconds, "exact_seconds_at_n": seconds * (n / len(x)) ** 2}
    raise ValueError(stage)


def raw_features(folder: Path, rows: int | None = None):
    """The first `rows` (all: None) rows of features.h5 as float32 (rows, 256)."""
    import h5py
    import numpy as np

    with h5py.File(folder / "features.h5", "r") as features:
        data = features["features"]
        return np.ascontiguousarray(data[: rows or len(data)], dtype=np.float32)


def reduced_features(folder: Path):
    """features.h5 through the clusters' own PCA (when they hold one) and L2 normalisation, with the library's
    code (`preprocess`, as `ssl pseudolabel` applies it): float32 (N, d)."""
    from ssl_cli.artifacts.h5 import H5Artifact
    from ssl_cli.clustering.preprocess import preprocess
    from ssl_cli.clustering.stream import pca_from_artifact

    with H5Artifact(folder / "clusters.h5", "clusters") as clusters:
        pca = pca_from_artifact(clusters)
    return preprocess(raw_features(folder), pca, overwrite_x=True)


def mine(folder: Path) -> dict[str, Any]:
    """The mining stage itself (child process): neighbours of every row, written to neighbours.h5."""
    import h5py
    import torch

    from ssl_cli.clustering.neighbours import search_neighbours

    x = torch.from_numpy(raw_features(folder))
    began = time.perf_counter()
    found = search_neighbours(x, NEIGHBOURS, method="auto")  # what `ssl cluster --method scan` mines with
    seconds = time.perf_counter() - began
    indices, distances = found.indices, found.distances
    out = folder / OUTPUTS["mine"]
    partial = out.with_name(out.name + ".partial")
    with h5py.File(partial, "w") as handle:
        handle["indices"], handle["distances"] = indices, distances
    os.replace(partial, out)
    return {"mining_seconds": seconds, "how": found.record}


# -- kill -9 and resume at N ----------------------------------------------------------------------------------------


def kill_and_resume(stage: str, n: int, work: Path, results: dict, fraction: float) -> dict[str, Any]:
    """`stage`'s command at N run again into work/n<N>-killed/ (its inputs linked from the chain's folder), killed
    with SIGKILL (the whole process group) `fraction` of the way through its measured time, re-run, and its
    output compared with the uninterrupted run's: every dataset's bytes (.h5; attributes hold timings) or every
    tensor of the model's state (.pt)."""
    import signal

    folder, other = work / f"n{n}", work / f"n{n}-killed"
    measured = results["runs"].get(str(n), {}).get(stage)
    if measured is None or not (folder / OUTPUTS[stage]).exists():
        raise SystemExit(f"run the chain at N = {n} first: `--kill {stage}` compares with its {OUTPUTS[stage]}")
    other.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS.values():
        link = other / name
        if name != OUTPUTS[stage] and (folder / name).exists() and not link.exists():
            link.symlink_to((folder / name).resolve())
    out = other / OUTPUTS[stage]
    for path in (out, out.with_name(out.name + ".partial")):
        path.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "ssl_cli", *ssl_command(stage, other, n)]
    log = other / "log.txt"
    with log.open("a") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=sink, cwd=ROOT, start_new_session=True)
        delay = fraction * measured["seconds"]
        try:
            process.wait(timeout=delay)
            raise SystemExit(f"{stage} finished before the kill at {delay:.0f} s; use a smaller --kill-at")
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    partial = out.with_name(out.name + ".partial")
    left = "a .partial" if partial.exists() else ("a checkpoint" if stage == "retrain" and out.exists() else "nothing")
    resumed = timed_process(argv, log)
    return {"killed_after_seconds": round(delay, 1), "left": left, "rerun_seconds": resumed["seconds"],
            "identical": same_output(folder / OUTPUTS[stage], out)}


def same_output(want: Path, got: Path) -> bool:
    if want.suffix == ".pt":
        import torch

        a, b = (torch.load(path, map_location="cpu", weights_only=False)["model"] for path in (want, got))
        return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    import h5py
    import numpy as np

    def datasets(handle) -> dict:
        found = {}
        handle.visititems(lambda name, item: found.setdefault(name, item) if isinstance(item, h5py.Dataset) else None)
        return found

    with h5py.File(want, "r") as a, h5py.File(got, "r") as b:
        left, right = datasets(a), datasets(b)
        return left.keys() == right.keys() and all(
            np.array_equal(left[name][...], right[name][...]) for name in left)


# -- the chain ------------------------------------------------------------------------------------------------------


def child(argv: list[str], log: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Run `python bench/scale.py <argv>` under time -v; (time figures, the JSON it printed last)."""
    out = log.with_suffix(".json")
    out.unlink(missing_ok=True)
    figures = timed_process([sys.executable, str(Path(__file__)), *argv, "--json-out", str(out)], log)
    return figures, json.loads(out.read_text())


def run_chain(n: int, work: Path, results: dict, again: set[str]) -> None:
    folder = work / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    record = results["runs"].setdefault(str(n), {})
    for stage in STAGES:
        out = folder / OUTPUTS[stage]
        if stage in record and out.exists() and stage not in again:
            continue
        if stage in again and out.exists():  # measured again from nothing, not "up to date"
            out.unlink()
        print(f"[n={n}] {stage} ...", flush=True)
        if stage == "mine":
            figures, extra = child(["--mine", str(folder)], log)
        else:
            figures = timed_process([sys.executable, "-m", "ssl_cli", *ssl_command(stage, folder, n)], log)
            extra = {}
        bare_figures, bare_extra = child(["--bare", stage, str(folder), str(n)], folder / f"bare-{stage}.txt")
        row = {**figures, **extra, "output_bytes": output_bytes(out),
               "bare": {**bare_figures, **bare_extra}}
        if "images_per_second" in bare_extra:
            row["images_per_second"] = n / figures["seconds"]
            row["ratio_to_bare"] = row["images_per_second"] / bare_extra["images_per_second"]
        elif stage != "mine":  # process against process: reading the features is work either way
            row["ratio_to_bare"] = figures["seconds"] / bare_figures["seconds"]
        if stage == "cluster":
            row["features_bytes"] = n * PCA_DIM * 4
            row["rss_over_features"] = figures["peak_rss_bytes"] / row["features_bytes"]
        record[stage] = row
        results["machine"] = machine()
        save(results)
        print(f"[n={n}] {stage}: {figures['seconds']:.1f} s, peak RSS {figures['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": [round(v, 2) for v in load],
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "date": time.strftime("%Y-%m-%d")}


def load_results(path: Path) -> dict:
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["path"] = str(path)
    return results


def save(results: dict) -> None:
    path = Path(results["path"])
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({k: v for k, v in results.items() if k != "path"}, indent=1) + "\n")
    os.replace(partial, path)


def growth(results: dict, stage: str) -> tuple[float, float] | None:
    """(time growth / N growth, RSS growth) between the smallest and largest N that ran `stage`."""
    runs = sorted((int(n), rows[stage]) for n, rows in results["runs"].items() if stage in rows)
    if len(runs) < 2:
        return None
    (n0, small), (n1, large) = runs[0], runs[-1]
    return (large["seconds"] / small["seconds"]) / (n1 / n0), large["peak_rss_bytes"] / small["peak_rss_bytes"]


def table(results: dict) -> str:
    sizes = sorted(int(n) for n in results["runs"])
    lines = ["| stage | " + " | ".join(f"N = {n:,}: s · peak RSS · output" for n in sizes) +
             " | time growth / N growth | RSS growth | vs bare (largest N) |",
             "|---" * (len(sizes) + 4) + "|"]
    for stage in STAGES:
        cells = []
        for n in sizes:
            row = results["runs"][str(n)].get(stage)
            cells.append("–" if row is None else
                         f"{row['seconds']:.0f} · {row['peak_rss_bytes'] / 2**20:,.0f} MiB · {row['output_bytes'] / 2**20:,.0f} MiB")
        grown = growth(results, stage)
        largest = next((results["runs"][str(n)][stage] for n in reversed(sizes) if stage in results["runs"][str(n)]), None)
        versus = "–"
        if largest and stage == "mine":
            versus = f"exact: {largest['bare']['exact_seconds_at_n']:,.0f} s projected"
            how = largest.get("how", {})
            if how.get("approximate"):
                versus += (f"; {how['method']} nlist {how.get('nlist')} nprobe {how.get('nprobe')}, "
                           f"recall@{NEIGHBOURS} {how.get('calibration_recall')} on {how.get('calibration_queries')} rows")
        elif largest and "images_per_second" in largest:
            versus = f"{largest['ratio_to_bare']:.2f} of bare images/s"
        elif largest and "ratio_to_bare" in largest:
            versus = f"{largest['ratio_to_bare']:.2f} x bare seconds"
            if "rss_over_features" in largest:
                versus += f"; RSS {largest['rss_over_features']:.2f} x features"
        lines.append(f"| {stage} | " + " | ".join(cells) +
                     (f" | {grown[0]:.2f} | {grown[1]:.2f} |" if grown else " | – | – |") + f" {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[80_000, 320_000, 1_281_167])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--again", nargs="*", default=[], choices=STAGES, help="stages measured again")
    parser.add_argument("--json", type=Path, default=RESULTS, help="results file (default: bench/scale.results.json)")
    parser.add_argument("--table", action="store_true", help="print the results table and stop")
    parser.add_argument("--kill", nargs="+", default=[], choices=STAGES[:-1],
                        help="after the chain: kill -9 these stages at each N, re-run, compare with the chain's output")
    parser.add_argument("--kill-at", type=float, default=0.5, help="when to kill, as a fraction of the stage's time")
    parser.add_argument("--bare", nargs=3, metavar=("STAGE", "FOLDER", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--mine", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare or args.mine:
        figures = bare(args.bare[0], Path(args.bare[1]), int(args.bare[2])) if args.bare else mine(args.mine)
        args.json_out.write_text(json.dumps(figures))
        return
    results = load_results(args.json)
    if args.table:
        print(table(results))
        return
    for n in args.rows:
        run_chain(n, args.work, results, set(args.again))
        for stage in args.kill:
            print(f"[n={n}] kill -9 {stage} at {args.kill_at:.0%} ...", flush=True)
            outcome = kill_and_resume(stage, n, args.work, results, args.kill_at)
            results["runs"][str(n)][stage]["kill_and_resume"] = outcome
            save(results)
            print(f"[n={n}] {stage} killed, re-run: {outcome}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
