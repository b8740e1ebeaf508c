"""`ssl cluster --method scan`: SCAN's three steps from a pretext checkpoint and images (see
`ssl_cli.clustering.scan`), each a resumable artifact in `scan-cache/` beside the output, named by a
short hash of what it depends on (so another --out from the same checkpoint, layer, pool size and
data reuses them, and a changed input makes a new one).

--scan-backbone train (the default, SCAN as published) trains the pretext network up to --layer (average-
pooled to --pool-size, flattened: what `ssl extract` reads) with the heads, in both steps, on images
augmented on the device (`BatchAugment`): the SCAN step on an anchor and one of its mined neighbours, both
weak views (flips, shifts), self-labelling on weak and strong views. The network's layers learn at
--backbone-lr, the heads at --lr (SCAN step) and --self-label-lr. --scan-backbone frozen trains the heads
alone, on the cached features of the frozen network (the SCAN step then costs no forward pass of it):

  features-<hash>.h5     `ssl extract` of --data by the pretext network at --layer (avg-pooled to
                         --pool-size): the neighbours are mined from it (and, frozen, the heads train on
                         it); frozen, also linked as <stem>.features.h5 beside the output
  neighbours-<hash>.h5   the --neighbours-k nearest neighbours of every image (or --neighbours PATH):
                         sample_ids, indices (N, K), cosine distances (N, K); attrs: agreement, and how
                         they were mined (method: exact, ivf or hnsw, with nlist, nprobe, the measured
                         recall..., see `ssl_cli.clustering.neighbours`)
  scan-<hash>.pt         after the SCAN step (the shared training loop): frozen, the clustering heads;
                         trained, a network checkpoint `ssl extract --model` reads (arch, input size,
                         normalisation, the trunk's state as the pretext checkpoint keeps it, --layer as
                         its feature layer) with the heads under "heads"
  features-<hash>.h5     trained: the SCAN step network's features of --data, on which the head is chosen
  selflabel-<hash>.pt    the kept head after self-labelling (unless --no-self-label); trained, with the
                         network, in the same form as scan-<hash>.pt
  <stem>.network.pt      trained: a link to the last network checkpoint (selflabel, or scan without
                         self-labelling); `ssl extract --model` on it at --pool-size gives <stem>.features.h5
  features-<hash>.h5     trained: that network's features of --data, linked as <stem>.features.h5
  <out>                  the clusters artifact `ssl cluster` writes for k-means: assignments, per-row
                         confidence (the head's top probability; distances = 1 - confidence),
                         cluster sizes, NMI/ARI/ACC against targets; plus the head (head_weight (k, D),
                         head_bias (k,), on features standardised by feature_mean and feature_std (D,))
                         that `ssl pseudolabel` applies to any features of that layer of the network
                         that came out; attrs scan_backbone and (trained) network, the linked checkpoint

With --assign-data, the clusters are those of other images (SCAN's protocol: train on the training
split, score the test split); their features (by the network that came out) are cached the same way and
linked as <stem>.assign-features.h5. The clusters' `intermediates` attribute names every file the run
used. The two variants share the features and neighbours of the pretext network; their other files and
the clusters' fingerprint differ (the frozen variant's are those of before --scan-backbone existed).

Under torchrun every step is shared by the ranks: `ssl extract` shards the images; each rank mines the
neighbours of its `row_share` of the rows against all rows; the SCAN step and self-labelling train through
the shared loop (DDP, each rank its share of every batch); each rank scores the heads and assigns its
share; the pieces are gathered, rank 0 writes every file (neighbours and clusters record `ranks` and
`rank_rows`) and the others wait at a barrier. At --batch-size B a rank, W ranks take the frozen SCAN step
one process takes at W x B (`scan_step`); self-labelling and the trained variant differ from one process
(the loop seeds each rank's augmentations by its rank, batch norm sees each rank's batch, and the class
weights come from each rank's confident rows).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_cli.artifacts.checkpoint import load_checkpoint
from ssl_cli.artifacts.h5 import H5Artifact, write_arrays
from ssl_cli.artifacts.outputs import artifact_fingerprint, plan_output
from ssl_cli.artifacts.schema import make_provenance
from ssl_cli.clustering.metrics import cluster_quality
from ssl_cli.clustering.neighbours import mining_settings, resolve_method, search_neighbours
from ssl_cli.clustering.scan import (ClusterHeads, ImageHeads, NeighbourImages, NeighbourPairs, NetworkHeads, assign,
                                     feature_statistics, head_losses, neighbour_agreement, scan_step)
from ssl_cli.clustering.summary import summary_of
from ssl_cli.config import ClusterConfig, ExtractConfig
from ssl_cli.data.batch_augment import BatchAugment, normalise_mode
from ssl_cli.data.resized import ResizedImages
from ssl_cli.data.sources import open_source
from ssl_cli.device import resolve_device
from ssl_cli.errors import UserError
from ssl_cli.models.layers import LayerReader
from ssl_cli.models.network import network_from_checkpoint, trained_state, untrained_record
from ssl_cli.pretext.losses.scan import self_label_loss
from ssl_cli.report import Reporter
from ssl_cli.stages import StageResult
from ssl_cli.stages import extract as extract_stage
from ssl_cli.train import distributed
from ssl_cli.train.loop import TrainOptions, train
from ssl_cli.train.recipe import default_shift

STRONG_MIN_SCALE = 0.3  # the grey view recipe's smallest crop (`ssl_cli.data.views`)
STRONG_JITTER = 0.4
# what the SCAN step's heads depend on beside the neighbours (the self-labelling settings do not)
SCAN_STEP_FIELDS = ("k", "heads", "entropy_weight", "scan_epochs", "batch_size", "lr", "seed", "neighbours_k")
CACHE_FOLDER = "scan-cache"
KEY_LENGTH = 16  # hex digits of the fingerprint in a cached file's name (64 bits: no collision in practice)


def cached(cfg: ClusterConfig, kind: str, fingerprint: str, suffix: str) -> Path:
    """Where an intermediate with this fingerprint lives: `scan-cache/<kind>-<fingerprint[:16]><suffix>` beside
    --out. Named by what it depends on, not by --out, so another --out from the same inputs finds it."""
    return cfg.out.parent / CACHE_FOLDER / f"{kind}-{fingerprint[:KEY_LENGTH]}{suffix}"


def beside_out(cfg: ClusterConfig, suffix: str) -> Path:
    """`<stem><suffix>` beside --out: the name a user passes on (`ssl pseudolabel --features <stem>.features.h5`)."""
    stem = cfg.out.with_suffix("")
    return stem.with_name(stem.name + suffix)


def link(name: Path, target: Path) -> None:
    """Make `name` a relative symlink to `target`, replacing what the stage (or an older ssl-cli) left there."""
    relative = Path(os.path.relpath(target, name.parent))
    if name.is_symlink() and Path(os.readlink(name)) == relative:
        return
    temporary = name.with_name(name.name + ".link")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(relative)
    os.replace(temporary, name)  # atomic: the name is never missing or half-made


def extract_config(cfg: ClusterConfig, data: str, out: Path) -> ExtractConfig:
    return ExtractConfig(data=data, model=cfg.model, layer=cfg.layer, pool="avg", pool_size=cfg.pool_size, out=out,
                         batch_size=256, workers=cfg.workers, device=cfg.device, progress=cfg.progress)


def stale(path: Path, fingerprint: str) -> bool:
    """The --force of a file the stage owns beside its output: replace it when it holds other settings or
    inputs (a changed pretext network, say); reuse it when up to date, resume its partial otherwise."""
    return path.exists() and artifact_fingerprint(path) != fingerprint


def prepared_extractions(cfg: ClusterConfig) -> dict[str, tuple[ExtractConfig, extract_stage.Prepared]]:
    """The `ssl extract` runs the stage makes ("features" of --data, "assign" of --assign-data), each
    prepared once: its config, network, layer and the fingerprint its output will have. The output is the
    cached file of that fingerprint (the output path is not part of it), shared by every --out."""
    sources = {"features": cfg.data, **({"assign": cfg.assign_data} if cfg.assign_data is not None else {})}
    extractions = {}
    for name, data in sources.items():
        prepared = extract_stage.prepare(extract_config(cfg, data, cfg.out))
        out = cached(cfg, "features", prepared.provenance.fingerprint, ".h5")
        extractions[name] = (extract_config(cfg, data, out), prepared)
    return extractions


def network_extraction(cfg: ClusterConfig, data: str, network_file: Path) -> tuple[ExtractConfig, extract_stage.Prepared]:
    """The `ssl extract` of `data` by a network the stage trained (`network_file`, a checkpoint `ssl extract
    --model` reads), at --layer pooled to --pool-size, into the cached file of its fingerprint."""
    config = extract_config(cfg, data, cfg.out).model_copy(update={"model": network_file})
    prepared = extract_stage.prepare(config)
    return config.model_copy(update={"out": cached(cfg, "features", prepared.provenance.fingerprint, ".h5")}), prepared


def extract_owned(config: ExtractConfig, prepared: extract_stage.Prepared, name: Path | None,
                  reporter: Reporter) -> Path:
    """Run an extraction whose output the stage owns (replaced when stale, reused when up to date) and link
    `name` beside --out to it (None: no link). Returns the cached file."""
    extract_stage.run(config.model_copy(update={"force": stale(config.out, prepared.provenance.fingerprint)}), reporter)
    group = distributed.join(resolve_device(config.device).type)  # under torchrun extract shards, then leaves the group
    if group.is_main and name is not None:
        link(name, config.out)
    distributed.barrier(group)
    return config.out


def provenance(cfg: ClusterConfig, extractions: dict | None = None):
    """The clusters' provenance: the settings and the fingerprints of the features they come from."""
    extractions = extractions or prepared_extractions(cfg)
    paths_of = {"features": str(cfg.model), "assign": cfg.assign_data}
    inputs = [{"path": paths_of[name], "fingerprint": prepared.provenance.fingerprint}
              for name, (_, prepared) in extractions.items()]
    return make_provenance("clusters", "cluster", cfg.recorded_config(), cfg.result_config(), inputs)


def run(cfg: ClusterConfig, reporter: Reporter) -> StageResult:
    began = time.perf_counter()
    if not cfg.model.exists():
        raise UserError(f"--model {cfg.model} does not exist; pass the checkpoint `ssl pretext` wrote")
    extractions = prepared_extractions(cfg)
    record = provenance(cfg, extractions)
    plan = plan_output(cfg.out, record.fingerprint, cfg.force)
    if plan.up_to_date:
        reporter.info(f"{cfg.out} is up to date; skipped")
        return StageResult("cluster", cfg.out, plan.state.value, summary_of(cfg.out))
    group = distributed.join(resolve_device(cfg.device).type)  # under torchrun: every step shared by the ranks
    source = open_source(cfg.data)
    if cfg.k > len(source):
        raise UserError(f"--k {cfg.k} is larger than the {len(source)} images of --data; use --k {len(source)} or less")
    (cfg.out.parent / CACHE_FOLDER).mkdir(parents=True, exist_ok=True)
    frozen = cfg.scan_backbone == "frozen"  # trained: <stem>.features.h5 is the trained network's, linked later
    files = {"features": extract_owned(*extractions["features"], beside_out(cfg, ".features.h5") if frozen else None,
                                       reporter)}
    features, targets, ids, fingerprint = read_features(files["features"])
    mining = resolve_method(cfg.neighbours_method, len(features), warn=reporter.warn)
    neighbours_record = make_provenance("neighbours", "scan", {"neighbours_k": cfg.neighbours_k,
                                                               "neighbours_method": cfg.neighbours_method},
                                        mining_settings(cfg.neighbours_k, mining),
                                        [{"path": str(files["features"]), "fingerprint": fingerprint}])
    files["neighbours"] = cfg.neighbours or cached(cfg, "neighbours", neighbours_record.fingerprint, ".h5")
    neighbours, agreement = neighbours_of(cfg, files["neighbours"], neighbours_record, mining, features, targets, ids,
                                          reporter)
    prepared = extractions["features"][1]
    steps = frozen_heads if frozen else trained_network
    kept, (features, targets, ids) = steps(cfg, source, extractions, files, (features, targets, ids), neighbours,
                                           neighbours_record.fingerprint, reporter)
    chosen, best, losses, confident = kept.heads, kept.head, kept.losses, kept.confident
    group = distributed.join(resolve_device(cfg.device).type)  # the training loop and extract leave the group
    device = compute_device(cfg, group)
    chosen = chosen.to(device)
    assignments, confidence, shares = assign(chosen, torch.from_numpy(features), group=group)
    sizes = np.bincount(assignments, minlength=cfg.k)
    quality = cluster_quality(targets, assignments)
    seconds = time.perf_counter() - began
    summary = {"k": cfg.k, "rows": len(assignments), "method": "scan", "head": best,
               "head_losses": [round(v, 4) for v in losses], "neighbour_agreement": agreement,
               "self_labelled": confident, "scan_backbone": cfg.scan_backbone, "empty_clusters": int((sizes == 0).sum()),
               "largest_cluster": int(sizes.max()), "seconds": round(seconds, 3), "metrics": quality,
               **({"ranks": group.world} if group.active else {})}
    chosen = chosen.cpu()
    if group.is_main:  # rank 0 writes; the others wait below, so the file is whole when any rank returns
        write_arrays(cfg.out, record, {
            "assignments": assignments, "confidence": confidence, "distances": 1.0 - confidence, "sample_ids": ids,
            "targets": targets, "cluster_sizes": sizes.astype(np.int64),
            "head_weight": chosen.heads[0].weight.detach().numpy().astype(np.float32),
            "head_bias": chosen.heads[0].bias.detach().numpy().astype(np.float32),
            "feature_mean": chosen.mean.numpy(), "feature_std": chosen.std.numpy(),
        }, attrs={key: value for key, value in {
            "k": cfg.k, "method": "scan", "n_empty": summary["empty_clusters"], "metrics": quality or {},
            "seconds": seconds, "head": best, "head_losses": losses, "neighbour_agreement": agreement,
            "self_labelled": confident, "layer": prepared.layer, "pool_size": cfg.pool_size,
            "scan_backbone": cfg.scan_backbone, "network": str(kept.network) if kept.network else None,
            "pca_dim_used": 0, "pca_whitened": False, "ranks": group.world, "rank_rows": shares,
            "intermediates": {name: str(path) for name, path in files.items()}}.items() if value is not None})
    distributed.barrier(group)
    distributed.teardown(group)
    return StageResult("cluster", cfg.out, "written", {k: v for k, v in summary.items() if v is not None})


@dataclass
class Kept:
    """What the SCAN step and self-labelling leave: the kept head (`ClusterHeads` of one head, on the CPU),
    its index among the SCAN step's heads, every head's whole-set loss, the images self-labelled in the last
    epoch (None without self-labelling) and the network checkpoint linked beside --out (None when frozen)."""

    heads: ClusterHeads
    head: int
    losses: list[float]
    confident: int | None = None
    network: Path | None = None


def one_head(heads: ClusterHeads, index: int) -> ClusterHeads:
    """Head `index` of `heads` alone (with the same standardisation), on the CPU."""
    chosen = ClusterHeads(heads.mean.shape[0], heads.heads[index].out_features, 1, heads.mean.cpu(), heads.std.cpu())
    chosen.heads[0].load_state_dict(heads.heads[index].state_dict())
    return chosen


def frozen_heads(cfg: ClusterConfig, source, extractions: dict, files: dict[str, Path], rows: tuple, neighbours: np.ndarray,
                 neighbours_fingerprint: str, reporter: Reporter) -> tuple[Kept, tuple]:
    """--scan-backbone frozen: the heads on the pretext network's cached features, self-labelling through the
    frozen network. Returns the kept head and the (features, targets, ids) the clusters assign."""
    features, targets, ids = rows
    prepared = extractions["features"][1]
    raw = torch.from_numpy(features)
    model, files["scan"], scan_record = scan_heads(cfg, raw, targets, ids, neighbours, files["neighbours"],
                                                   neighbours_fingerprint, reporter)
    group = distributed.join(resolve_device(cfg.device).type)  # the training loop leaves the group at its end
    losses = head_losses(model.to(compute_device(cfg, group)), raw, neighbours, cfg.entropy_weight, group)
    best = int(np.argmin(losses))
    chosen = one_head(model, best)
    confident = None
    if cfg.self_label:
        network = prepared.network
        reader = LayerReader(network.model, network.spec, prepared.layer, "avg", cfg.pool_size)
        images = ResizedImages(source, np.arange(len(source)), np.asarray(source.targets), network.input_size)
        chosen, confident, files["selflabel"] = self_label(
            cfg, files["scan"], scan_record, images, network, ImageHeads(reader, chosen),
            lambda m: {"model": m.cluster_heads.state_dict(), "meta": {"task": "scan-self-label", "k": cfg.k}}, reporter)
        group = distributed.join(resolve_device(cfg.device).type)
    if cfg.assign_data is not None:
        files["assign"] = extract_owned(*extractions["assign"], beside_out(cfg, ".assign-features.h5"), reporter)
        features, targets, ids, _ = read_features(files["assign"])
    return Kept(chosen, best, losses, confident), (features, targets, ids)


def trained_network(cfg: ClusterConfig, source, extractions: dict, files: dict[str, Path], rows: tuple,
                    neighbours: np.ndarray, neighbours_fingerprint: str, reporter: Reporter) -> tuple[Kept, tuple]:
    """--scan-backbone train, SCAN as published: the SCAN step trains the pretext network up to --layer with
    the heads on augmented (anchor, neighbour) images; the lowest-loss head is chosen on the trained network's
    features of --data; self-labelling trains that network and head on. The last network is linked as
    <stem>.network.pt, its features of --data as <stem>.features.h5 (and of --assign-data). Returns the kept
    head and the (features, targets, ids) the clusters assign: the trained network's."""
    features, targets, ids = rows
    prepared = extractions["features"][1]
    pretext = load_checkpoint(cfg.model)["meta"]
    images = ResizedImages(source, source_rows(source, ids), targets, prepared.network.input_size)  # row i: feature i
    files["scan"], scan_record = scan_network(cfg, prepared.layer, pretext, images, torch.from_numpy(features),
                                              neighbours, files["neighbours"], neighbours_fingerprint, reporter)
    del features
    files["scan_features"] = extract_owned(*network_extraction(cfg, cfg.data, files["scan"]), None, reporter)
    scanned = torch.from_numpy(read_features(files["scan_features"])[0])
    heads = ClusterHeads(scanned.shape[1], cfg.k, cfg.heads)
    heads.load_state_dict(load_checkpoint(files["scan"])["heads"])
    group = distributed.join(resolve_device(cfg.device).type)
    losses = head_losses(heads.to(compute_device(cfg, group)), scanned, neighbours, cfg.entropy_weight, group)
    del scanned
    best = int(np.argmin(losses))
    chosen = one_head(heads, best)
    confident, network_file = None, files["scan"]
    if cfg.self_label:
        network = network_from_checkpoint(files["scan"])
        model = NetworkHeads(layer_reader(network, prepared.layer, cfg.pool_size), chosen,
                             cfg.backbone_lr / cfg.self_label_lr)
        chosen, confident, files["selflabel"] = self_label(
            cfg, files["scan"], scan_record, images, network, model,
            lambda m: network_payload(network, prepared.layer, pretext, m.cluster_heads, "scan-self-label", cfg.k),
            reporter, {"scan_backbone": "train", "backbone_lr": cfg.backbone_lr})
        network_file = files["selflabel"]
    del images
    linked = beside_out(cfg, ".network.pt")
    group = distributed.join(resolve_device(cfg.device).type)
    if group.is_main:
        link(linked, network_file)
    distributed.barrier(group)
    files["network_features"] = extract_owned(*network_extraction(cfg, cfg.data, network_file),
                                              beside_out(cfg, ".features.h5"), reporter)
    assigned = files["network_features"]
    if cfg.assign_data is not None:
        files["assign"] = extract_owned(*network_extraction(cfg, cfg.assign_data, network_file),
                                        beside_out(cfg, ".assign-features.h5"), reporter)
        assigned = files["assign"]
    features, targets, ids, _ = read_features(assigned)
    return Kept(chosen, best, losses, confident, linked), (features, targets, ids)


def layer_reader(network, layer: str, pool_size: int) -> LayerReader:
    """The network up to `layer`, average-pooled to `pool_size` and flattened, as `ssl extract` reads it; its
    modules are the network's own, so training the reader trains `network.model`."""
    return LayerReader(network.model, network.spec, layer, "avg", pool_size)


def source_rows(source, ids: np.ndarray) -> np.ndarray:
    """The source positions (N,) of the sample ids (N,) of a features file (extract skips unreadable images)."""
    if len(ids) == len(source) and np.array_equal(np.asarray(ids, dtype=object), np.asarray(source.sample_ids, dtype=object)):
        return np.arange(len(ids))
    position = {sample_id: index for index, sample_id in enumerate(source.sample_ids)}
    return np.array([position[str(sample_id)] for sample_id in ids], dtype=np.int64)


def weak_view(network) -> BatchAugment:
    """Flips and shifts of up to `default_shift` pixels: the SCAN step's views, self-labelling's label view."""
    return BatchAugment(network.mean, network.std, shift=default_shift(network.input_size), flip=True,
                        normalise=normalise_mode(network.input_mode, network.per_image_normalise))


def strong_view(network) -> BatchAugment:
    """Random resized crops (area >= STRONG_MIN_SCALE), shifts, flips and colour jitter: what self-labelling learns."""
    return BatchAugment(network.mean, network.std, min_scale=STRONG_MIN_SCALE, shift=default_shift(network.input_size),
                        flip=True, color_jitter=STRONG_JITTER,
                        normalise=normalise_mode(network.input_mode, network.per_image_normalise))


def network_payload(network, layer: str, pretext: dict, heads: ClusterHeads, task: str, k: int) -> dict:
    """A checkpoint `ssl extract --model` reads: the network as its pretext checkpoint (`pretext`: that
    checkpoint's meta) records one (arch and options, input size, normalisation; modules the pretext stage
    never trained are left out as it left them, rebuilt from their recorded seed), `layer` as the feature
    layer, and the clustering heads' state under "heads"."""
    untrained = pretext.get("untrained") if network.projection is None else None
    modules = tuple(untrained.get("modules", [])) if untrained else ()
    meta = {**network.describe(), "feature_layer": layer, "task": task, "k": k, "pretext_task": pretext.get("task")}
    if modules:
        meta["untrained"] = untrained_record(modules, int(untrained.get("init_seed", 0)))
    return {"meta": meta, "model": trained_state(network.model, modules), "heads": heads.state_dict()}


def scan_network(cfg: ClusterConfig, layer: str, pretext: dict, images: ResizedImages, raw: torch.Tensor,
                 neighbours: np.ndarray, neighbours_file: Path, neighbours_fingerprint: str, reporter: Reporter):
    """The SCAN step as published: the pretext network up to `layer` and `--heads` heads, trained through the
    shared loop on weakly augmented (anchor, neighbour) images (`NeighbourImages`); the heads standardise with
    the statistics of the pretext features raw (N, D). Returns the cached network checkpoint and its provenance."""
    network = network_from_checkpoint(cfg.model)  # its own copy: the step trains it in place
    with torch.random.fork_rng(devices=[]):  # the heads' start depends on --seed alone
        torch.manual_seed(cfg.seed)
        heads = ClusterHeads(raw.shape[1], cfg.k, cfg.heads, *feature_statistics(raw))
    model = NetworkHeads(layer_reader(network, layer, cfg.pool_size), heads, cfg.backbone_lr / cfg.lr)
    weak = weak_view(network)
    options = TrainOptions(epochs=cfg.scan_epochs, batch_size=min(cfg.batch_size, rows_per_rank(len(images))),
                           lr=cfg.lr, optimizer="adamw", weight_decay=1e-4, schedule="constant", seed=cfg.seed,
                           device=cfg.device, workers=cfg.workers, progress=cfg.progress)
    record = make_provenance("checkpoint", "scan", cfg.recorded_config(),
                             {"step": "scan", **{name: getattr(cfg, name) for name in SCAN_STEP_FIELDS},
                              "scan_backbone": "train", "backbone_lr": cfg.backbone_lr},
                             [{"path": str(neighbours_file), "fingerprint": neighbours_fingerprint}])
    out = cached(cfg, "scan", record.fingerprint, ".pt")
    train(model, NeighbourImages(images, neighbours, cfg.seed), scan_step(cfg.entropy_weight), options, out, record,
          lambda m: network_payload(network, layer, pretext, m.cluster_heads, "scan", cfg.k),
          force=stale(out, record.fingerprint), reporter=reporter,
          batch_transform=lambda views, generator: [weak(view, generator) for view in views])
    return out, record


def compute_device(cfg: ClusterConfig, group: distributed.ProcessGroup) -> torch.device:
    """Where the heads are scored and the rows assigned: --device, this rank's GPU under torchrun."""
    device = resolve_device(cfg.device)
    return torch.device("cuda", group.local_rank) if device.type == "cuda" and group.active else device


def scan_heads(cfg: ClusterConfig, raw: torch.Tensor, targets: np.ndarray, ids: np.ndarray, neighbours: np.ndarray,
               neighbours_file: Path, neighbours_fingerprint: str, reporter: Reporter):
    """The SCAN step: `--heads` heads trained on (image, neighbour) pairs of the features raw (N, D) through
    the shared loop (under torchrun each rank its share of every batch, see `scan_step`). Returns the heads
    (on the CPU), their cached checkpoint and its provenance."""
    with torch.random.fork_rng(devices=[]):  # the heads' start depends on --seed alone
        torch.manual_seed(cfg.seed)
        model = ClusterHeads(raw.shape[1], cfg.k, cfg.heads, *feature_statistics(raw))
    options = TrainOptions(epochs=cfg.scan_epochs, batch_size=min(cfg.batch_size, rows_per_rank(len(raw))), lr=cfg.lr,
                           optimizer="adamw", weight_decay=1e-4, schedule="constant", seed=cfg.seed,
                           device=cfg.device, workers=0, progress=cfg.progress)
    record = make_provenance("checkpoint", "scan", cfg.recorded_config(),
                             {"step": "scan", **{name: getattr(cfg, name) for name in SCAN_STEP_FIELDS}},
                             [{"path": str(neighbours_file), "fingerprint": neighbours_fingerprint}])
    out = cached(cfg, "scan", record.fingerprint, ".pt")
    train(model, NeighbourPairs(raw, targets, neighbours, cfg.seed, ids), scan_step(cfg.entropy_weight), options,
          out, record, lambda m: {"model": m.state_dict(), "meta": {"task": "scan-heads", "k": cfg.k}},
          force=stale(out, record.fingerprint), reporter=reporter)
    model.load_state_dict(load_checkpoint(out)["model"])
    return model.cpu(), out, record


def rows_per_rank(n: int) -> int:
    """The rows each torchrun rank trains on (all n in one process): the largest batch the loop takes."""
    return -(-n // distributed.launched_world()[1])


def read_features(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(features (N, D) float32, targets (N,), sample ids (N,), fingerprint) of an extract output."""
    with H5Artifact(path, "features", required=("features", "sample_ids")) as handle:
        targets = handle.array("targets") if "targets" in handle else np.full(handle.rows("features"), -1, np.int64)
        return (handle.array("features").astype(np.float32, copy=False), targets.astype(np.int64),
                handle.strings("sample_ids"), handle.fingerprint)  # float32 on disk: no copy


def neighbours_of(cfg: ClusterConfig, path: Path, record, method: str, features: np.ndarray, targets: np.ndarray,
                  ids: np.ndarray, reporter: Reporter) -> tuple[np.ndarray, float | None]:
    """The (N, K) neighbour indices from `path` when it holds `record`'s fingerprint (made from these features
    with these settings), else mined by `method` (exact, ivf or hnsw) and written there with what ran."""
    given = cfg.neighbours is not None  # the user's file; the default one beside the output is the stage's own
    if path.exists():
        with H5Artifact(path, "neighbours", required=("indices", "sample_ids")) as existing:
            other_images = len(existing["sample_ids"]) != len(ids) or \
                not np.array_equal(existing.strings("sample_ids"), ids)
            if other_images and given:
                raise UserError(f"--neighbours {path} holds the neighbours of other images than --data {cfg.data}; "
                                "pass another --neighbours path or delete that file")
            if existing.fingerprint == record.fingerprint:
                reporter.info(f"{path} is up to date; reused")
                return existing.array("indices"), existing.attrs.get("agreement")
    # a --neighbours file made with other settings needs --force; the stage's own is replaced when stale
    plan_output(path, record.fingerprint, cfg.force if given else stale(path, record.fingerprint))
    group = distributed.current_group()  # under torchrun each rank mines its share of the query rows
    share = distributed.row_share(len(features), group)
    with reporter.progress(f"neighbours (k={cfg.neighbours_k}, cosine, {method})", total=len(share)) as advance:
        found = search_neighbours(torch.from_numpy(features), cfg.neighbours_k, method,
                                  rows=slice(share.start, share.stop), device=compute_device(cfg, group),
                                  warn=reporter.warn, advance=advance)
    shares = distributed.gather_counts(len(found.indices), group)
    indices = distributed.gather_rows(torch.from_numpy(found.indices), len(features), group).numpy()
    distances = distributed.gather_rows(torch.from_numpy(found.distances), len(features), group).numpy()
    agreement = neighbour_agreement(indices, targets)
    if group.is_main:  # the others wait at the barrier below
        write_arrays(path, record, {"sample_ids": ids, "indices": indices, "distances": distances},
                     {"k": cfg.neighbours_k, **found.record, "ranks": group.world, "rank_rows": shares,
                      **({"agreement": agreement} if agreement is not None else {})})
    distributed.barrier(group)
    if found.record["approximate"]:
        reporter.info(f"neighbours: {method} index, recall@{cfg.neighbours_k} "
                      f"{found.record.get('calibration_recall', 'not measured')} on a sample against exact")
    if agreement is not None:
        reporter.info(f"neighbours: {agreement:.3f} of them share the image's class")
    return indices, agreement


def self_label(cfg: ClusterConfig, scan_file: Path, scan_record, images: ResizedImages, network, model,
               payload, reporter: Reporter, trained: dict | None = None) -> tuple[ClusterHeads, int, Path]:
    """Train the kept head (`model.cluster_heads`, under the frozen `ImageHeads` or the training `NetworkHeads`)
    on its own confident predictions of `images`: the weak view (flips and shifts) picks the labels, the strong
    view (crops and jitter) learns them. `payload` makes the checkpoint; `trained` adds the network's settings to
    its fingerprint. Returns the head, the number of images that were confident in the last epoch and the
    cached checkpoint."""
    weak, strong = weak_view(network), strong_view(network)
    threshold = cfg.threshold

    def step(module, inputs, targets, context=None):
        weak_view, strong_view = inputs
        logits = module(torch.cat([weak_view, strong_view]))[0].float()
        loss, count = self_label_loss(logits[: len(weak_view)], logits[len(weak_view):], threshold)
        return loss, count / len(weak_view)  # "accuracy" of the metrics file: the confident fraction

    options = TrainOptions(epochs=cfg.self_label_epochs, batch_size=min(cfg.batch_size, rows_per_rank(len(images))),
                           lr=cfg.self_label_lr, optimizer="adamw", weight_decay=1e-4, schedule="constant", seed=cfg.seed,
                           device=cfg.device, workers=cfg.workers, progress=cfg.progress)
    record = make_provenance("checkpoint", "scan", cfg.recorded_config(),
                             {"step": "self-label", "threshold": cfg.threshold, "epochs": cfg.self_label_epochs,
                              "lr": cfg.self_label_lr, "batch_size": cfg.batch_size, "seed": cfg.seed, **(trained or {})},
                             [{"path": str(scan_file), "fingerprint": scan_record.fingerprint}])
    out = cached(cfg, "selflabel", record.fingerprint, ".pt")
    result = train(model, images, step, options, out, record, payload, force=stale(out, record.fingerprint),
                   reporter=reporter, batch_transform=lambda x, g: [weak(x, g), strong(x, g)])
    saved = load_checkpoint(out)
    heads = model.cluster_heads.cpu()
    heads.load_state_dict(saved["heads"] if "heads" in saved else saved["model"])
    history = result.history or saved["meta"]["history"]
    return heads, int(round((history[-1]["accuracy"] or 0.0) * len(images))), out
