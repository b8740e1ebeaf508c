"""`ssl extract`: one feature row per image from a named layer, streamed to HDF5 in resumable chunks.

Under torchrun each rank extracts one contiguous shard of the source (whole batches of the
one-process run, so every row is computed in the same batch and the features are the same bytes)
into its own resumable part file beside the output, `<out>.rank<r>-of-<W>.partial`, renamed to
`<out>.rank<r>-of-<W>` when the shard is done. When every rank is done, rank 0 copies the parts in
rank order into `<out>` (through `<out>.partial`) and removes them. A re-run with the same W resumes
each unfinished part and skips the finished ones; a re-run with another W starts over. Every rank
writes beside `--out`, so on several machines `--out` must be on a filesystem they all share.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_cli.artifacts.h5 import H5Artifact, RowWriter, partial_path
from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.outputs import OutputState, artifact_fingerprint, plan_output
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.config import ExtractConfig
from ssl_cli.data.dataset import SourceDataset, threaded_batches
from ssl_cli.data.sources import H5ImageSource, ImageSource, open_source, source_input
from ssl_cli.data.transforms import eval_batch, eval_transform
from ssl_cli.device import autocast, inference_input, prepare_module, resolve_device
from ssl_cli.errors import UserError
from ssl_cli.models.layers import LayerReader
from ssl_cli.models.network import Network, network_from_arch, network_from_checkpoint
from ssl_cli.models.registry import check_layer, get_arch
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult
from ssl_cli.train import distributed

# Rows are flushed every FLUSH_BATCHES batches; a resumed run restarts at a batch boundary of the
# uninterrupted run, so every row sees the same batch and the file ends byte-identical.
FLUSH_BATCHES = 8
# Rows copied at a time when rank 0 merges the parts (bounds the merge's memory by a block).
MERGE_BLOCK_BYTES = 64 * 2**20


def load_network(cfg: ExtractConfig) -> Network:
    # ExtractConfig guarantees exactly one of --model (which records everything) and --arch
    if cfg.model is not None:
        return network_from_checkpoint(cfg.model)
    return network_from_arch(cfg.arch, cfg.weights, cfg.image_size, cfg.seed, arch_kwargs(cfg.arch, cfg.width))


def arch_kwargs(arch: str, width: float | None) -> dict[str, float]:
    """--width for the archs with a channel multiplier, passed to build_model as retrain does."""
    if width is None:
        return {}
    if "width" not in inspect.signature(get_arch(arch).build).parameters:
        raise UserError(f"--width: {arch} has no channel multiplier (the *_lowres alexnet and vgg archs have one, "
                        "see `ssl archs`); drop --width")
    return {"width": width}


@dataclass
class Prepared:
    source: ImageSource
    network: Network
    layer: str
    provenance: Provenance


def prepare(cfg: ExtractConfig) -> Prepared:
    """Open the inputs and compute the output's provenance; writes nothing."""
    source = open_source(cfg.data)
    network = load_network(cfg)
    layer = cfg.layer or network.feature_layer or network.spec.feature_layer
    check_layer(network.spec, layer)
    provenance = make_provenance(
        "features", "extract", cfg.recorded_config() | {"layer": layer},
        cfg.result_config() | {"layer": layer, "network": network.describe()},
        [source_input(source), *network.inputs],
    )
    return Prepared(source, network, layer, provenance)


def provenance(cfg: ExtractConfig) -> Provenance:
    return prepare(cfg).provenance


@claim_scope()  # the output stays locked at least until run returns (see artifacts.lock)
def run(cfg: ExtractConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or SilentReporter()
    prepared = prepare(cfg)
    source, network, layer, provenance = prepared.source, prepared.network, prepared.layer, prepared.provenance
    plan = plan_output(cfg.out, provenance.fingerprint, cfg.force)
    if plan.up_to_date:
        reporter.info(f"{cfg.out} is up to date; skipped")
        return StageResult("extract", cfg.out, plan.state.value, summary_of(cfg.out))

    reader = LayerReader(network.model, network.spec, layer, cfg.pool, cfg.pool_size).eval()
    device = resolve_device(cfg.device)
    group = distributed.join(device.type)  # a no-op without torchrun
    if group.active and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    reader = prepare_module(reader, device)
    dim = feature_dim(reader, network.input_size, device)
    if group.active:
        return run_sharded(cfg, prepared, reader, device, dim, group, reporter)
    writer = RowWriter.resume(cfg.out, provenance.fingerprint) if plan.state is OutputState.RESUME else None
    if writer is not None and writer.get_attr("merging"):
        writer.discard()  # an interrupted merge of torchrun parts: only the same torchrun resumes those
        writer = None
    resumed = writer is not None
    if writer is None:
        writer = create_writer(cfg.out, prepared, dim, cfg.dtype)
    try:
        skipped = stream_features(cfg, source, network, reader, device, writer, reporter, range(len(source)))
    except UserError:
        writer.discard()  # NaN features come back on every re-run of the same inputs: nothing to resume
        raise
    except BaseException:
        writer.close()  # flushed blocks stay in <out>.partial; the same command resumes from them
        raise
    rows = writer.rows_done
    writer.set_attrs(ranks=1, rank_rows=[rows], rank_source_rows=[[0, len(source)]])
    writer.commit()
    remove_parts(cfg.out)
    if skipped:
        reporter.warn(f"skipped {len(skipped)} unreadable image(s), e.g. {', '.join(skipped[:3])}; named in {cfg.out}")
    summary = {"rows": rows, "dim": dim, "layer": layer, "skipped": len(skipped), "resumed": resumed}
    return StageResult("extract", cfg.out, "resumed" if resumed else "written", summary)


def create_writer(out: Path, prepared: Prepared, dim: int, dtype: str) -> RowWriter:
    """A fresh `<out>.partial` with the features layout and the attributes every features file has."""
    writer = RowWriter.create(
        out, prepared.provenance,
        columns={"features": ((dim,), dtype), "sample_ids": ((), str), "targets": ((), np.int64)},
    )
    writer.set_attrs(source_done=0, n_skipped=0, layer=prepared.layer, arch=prepared.network.spec.name, dim=dim,
                     classes=prepared.source.classes)
    return writer


# --- torchrun: one shard per rank, merged by rank 0 ------------------------------------------------

def shard_rows(n: int, batch_size: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of `n` source rows: whole batches of the one-process run
    (batch b holds rows [b * batch_size, (b + 1) * batch_size)), batches split as evenly as possible."""
    batches = -(-n // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return range(min(n, first * batch_size), min(n, last * batch_size))


def part_path(out: Path, rank: int, world: int) -> Path:
    """The finished part of `rank` (its partial is this path + `.partial`)."""
    return out.with_name(f"{out.name}.rank{rank}-of-{world}")


def remove_parts(out: Path) -> None:
    """Delete every rank part of `out` (finished or partial, of any world size)."""
    for path in out.parent.glob(f"{out.name}.rank*-of-*"):
        path.unlink(missing_ok=True)


def run_sharded(cfg: ExtractConfig, prepared: Prepared, reader: torch.nn.Module, device: torch.device, dim: int,
                group: distributed.ProcessGroup, reporter: Reporter) -> StageResult:
    """Every rank extracts its shard to its part file; rank 0 then merges the parts into `cfg.out`."""
    error: UserError | None = None
    try:
        resumed = extract_part(cfg, prepared, reader, device, dim, group, reporter)
    except UserError as problem:  # the other ranks must hear of it, not wait for this rank for ever
        error = problem
    if distributed.any_rank(error is not None, group, device):
        distributed.teardown(group)
        raise error or UserError("another torchrun rank stopped on bad input (its message is above); "
                                 "fix that and run the same command again")
    if not group.is_main:
        distributed.barrier(group)  # returns once rank 0 has written cfg.out, so a next stage may read it
        distributed.teardown(group)
        return StageResult("extract", cfg.out, "written by rank 0", {})
    try:
        rows, skipped = merge_parts(cfg.out, prepared, dim, cfg.dtype, group.world)
    finally:
        distributed.barrier(group)
        distributed.teardown(group)
    if skipped:
        reporter.warn(f"skipped {len(skipped)} unreadable image(s), e.g. {', '.join(skipped[:3])}; named in {cfg.out}")
    summary = {"rows": rows, "dim": dim, "layer": prepared.layer, "skipped": len(skipped), "resumed": resumed,
               "ranks": group.world}
    return StageResult("extract", cfg.out, "resumed" if resumed else "written", summary)


def extract_part(cfg: ExtractConfig, prepared: Prepared, reader: torch.nn.Module, device: torch.device, dim: int,
                 group: distributed.ProcessGroup, reporter: Reporter) -> bool:
    """Extract this rank's shard into its part file, resuming it when it is there; True if resumed."""
    fingerprint = prepared.provenance.fingerprint
    part = part_path(cfg.out, group.rank, group.world)
    if cfg.force:
        part.unlink(missing_ok=True)
        partial_path(part).unlink(missing_ok=True)
    if artifact_fingerprint(part) == fingerprint:
        return True  # finished before an interruption of the other ranks or of the merge
    rows = shard_rows(len(prepared.source), cfg.batch_size, group.rank, group.world)
    writer = RowWriter.resume(part, fingerprint)
    resumed = writer is not None
    if writer is None:
        writer = create_writer(part, prepared, dim, cfg.dtype)
        writer.set_attrs(source_done=rows.start, rank=group.rank, world=group.world,
                         shard_start=rows.start, shard_stop=rows.stop)
    try:
        stream_features(cfg, prepared.source, prepared.network, reader, device, writer, reporter, rows)
    except UserError:
        writer.discard()
        raise
    except BaseException:
        writer.close()
        raise
    writer.commit()
    return resumed


def merge_parts(out: Path, prepared: Prepared, dim: int, dtype: str, world: int) -> tuple[int, list[str]]:
    """Rank 0: copy the finished parts, in rank order, into `<out>.partial`, commit it, delete the parts.
    The merge itself is not resumable (it is a copy): a killed merge is redone from the parts."""
    writer = create_writer(out, prepared, dim, dtype)
    writer.set_attrs(merging=True)
    skipped: list[str] = []
    rank_rows, rank_source_rows, rates = [], [], []
    block = max(1, MERGE_BLOCK_BYTES // (dim * np.dtype(dtype).itemsize))
    try:
        for rank in range(world):
            with H5Artifact(part_path(out, rank, world), "features") as part:
                attrs = part.attrs
                skipped += list(part.strings("skipped_ids")[: int(attrs.get("n_skipped", 0))]) \
                    if "skipped_ids" in part else []
                for offset in range(0, part.rows("features"), block):
                    rows = slice(offset, offset + block)
                    writer.append(features=part["features"][rows], targets=part["targets"][rows],
                                  sample_ids=np.asarray(part["sample_ids"].asstr()[rows], dtype=object))
                rank_rows.append(part.rows("features"))
                rank_source_rows.append([int(attrs["shard_start"]), int(attrs["shard_stop"])])
                rates.append(float(attrs.get("images_per_second", 0.0)))
        if skipped:
            writer.write_array("skipped_ids", np.array(skipped, dtype=object))
        writer.set_attrs(source_done=len(prepared.source), n_skipped=len(skipped), images_per_second=sum(rates),
                         ranks=world, rank_rows=rank_rows, rank_source_rows=rank_source_rows)
        del writer.handle.attrs["merging"]
    except BaseException:
        writer.close()
        raise
    rows = writer.rows_done
    writer.commit()
    remove_parts(out)
    return rows, skipped


def feature_dim(reader: torch.nn.Module, size: int, device: torch.device) -> int:
    """Width of the rows `reader` gives for (3, size, size) images.

    Found on the meta device (shapes only, no arithmetic): a real batch of one costs a new set of
    oneDNN kernels for that shape on CPU, measured at 1-1.6 s on 2 cores (3% of extracting 1000
    images at 32 px) for one number. A layer without meta kernels gets the real batch of one.
    """
    tensors = {**dict(reader.named_parameters()), **dict(reader.named_buffers())}
    try:
        shapes_only = {name: torch.empty_like(tensor, device="meta") for name, tensor in tensors.items()}
        probe = torch.empty(1, 3, size, size, device="meta")
        return int(torch.func.functional_call(reader, shapes_only, (probe,)).shape[1])
    except (NotImplementedError, RuntimeError):
        with torch.no_grad():
            return int(reader(torch.zeros(1, 3, size, size, device=device)).shape[1])


def stream_features(cfg: ExtractConfig, source: ImageSource, network: Network, reader: torch.nn.Module,
                    device: torch.device, writer: RowWriter, reporter: Reporter, rows: range) -> list[str]:
    """Read the source `rows` (a contiguous range) in batches from `source_done` on, append whole
    blocks, record progress after each block. Returns the ids of the unreadable images skipped."""
    start = max(rows.start, int(writer.get_attr("source_done", rows.start)))
    skipped = list(writer.handle["skipped_ids"].asstr()[...]) if "skipped_ids" in writer.handle else []
    # ids written by a block whose rows never counted as done are named again when it is re-read
    skipped = skipped[: int(writer.get_attr("n_skipped", 0))]
    if reads_rows(source, network):
        loader = store_batches(source, network, range(start, rows.stop), cfg.batch_size)
    else:
        dataset = SourceDataset(source, eval_transform(network.input_size, network.mean, network.std,
                                                       network.per_image_normalise, network.input_mode),
                                indices=range(start, rows.stop),
                                placeholder_shape=(3, network.input_size, network.input_size))
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
    store = np.float16 if cfg.dtype == "float16" else np.float32
    block: list[tuple[np.ndarray, np.ndarray]] = []
    done = start
    began = time.perf_counter()
    with reporter.progress(f"extract {writer.get_attr('layer')}", total=len(rows),
                           completed=start - rows.start) as advance, \
            torch.inference_mode():
        for batch, (images, indices, ok) in enumerate(loader, start=1):
            with autocast(device):
                features = reader(inference_input(images, device)).float()
            if not torch.isfinite(features).all():
                raise UserError(f"the network produced NaN/inf features for images near {source.sample_ids[int(indices[0])]}; "
                                "check the checkpoint (a diverged training run?)")
            block.append((features.cpu().numpy().astype(store), indices.numpy(), ok.numpy()))
            done += len(indices)
            advance(len(indices))
            if batch % FLUSH_BATCHES == 0 or done == rows.stop:
                skipped += flush(block, source, writer, skipped, done)
                block = []
    writer.set_attrs(images_per_second=(done - start) / max(time.perf_counter() - began, 1e-9))
    return skipped


def reads_rows(source: ImageSource, network: Network) -> bool:
    """Whether `source` is a packed store whose rows are already what `eval_transform` would make of them
    (uint8, RGB or grey, at the network's input size, plain RGB input): then batches are read as row blocks
    and converted on the batch (`store_batches`) instead of image by image through PIL in worker processes,
    which on 2 cores took the cores from the network (a third of the bare forward pass's images/s)."""
    return (isinstance(source, H5ImageSource) and source.native_size == network.input_size
            and network.input_mode == "rgb" and len(source.shape) == 4 and source.shape[-1] in (1, 3)
            and source.dtype == np.uint8)


def store_batches(source: H5ImageSource, network: Network, rows: range, batch_size: int) -> Iterator:
    """(images (B, 3, S, S) float32, source indices (B,) int64, ok (B,) bool) for the batches of `rows`
    that a DataLoader over them would give, each read as one block of the store by a thread ahead of the
    network, with the same tensors as the per-image path (`eval_batch`)."""
    store = H5Artifact(source.path, "images")
    images = store["images"]

    def fetch(batch: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(images[batch.start:batch.stop])
        converted = eval_batch(pixels, network.mean, network.std, network.per_image_normalise)
        return converted, torch.arange(batch.start, batch.stop), torch.ones(len(batch), dtype=torch.bool)

    batches = (rows[offset:offset + batch_size] for offset in range(0, len(rows), batch_size))
    try:
        yield from threaded_batches(fetch, batches, threads=1, ahead=2)
    finally:
        store.close()


def flush(block: list[tuple[np.ndarray, np.ndarray, np.ndarray]], source: ImageSource, writer: RowWriter,
          skipped: list[str], source_done: int) -> list[str]:
    """Append a block's readable rows and, in the same flush, how far the source has been read."""
    features = np.concatenate([item[0] for item in block])
    indices = np.concatenate([item[1] for item in block])
    ok = np.concatenate([item[2] for item in block]).astype(bool)
    ids = np.array([source.sample_ids[i] for i in indices], dtype=object)
    bad = list(ids[~ok])
    if bad:
        writer.write_array("skipped_ids", np.array(skipped + bad, dtype=object))
    writer.append(features=features[ok], sample_ids=ids[ok], targets=source.targets[indices[ok]],
                  attrs={"source_done": source_done, "n_skipped": len(skipped) + len(bad)})
    return bad


def summary_of(path: Path) -> dict:
    with H5Artifact(path, "features") as features:
        return {"rows": features.rows("features"), "dim": int(features["features"].shape[1]),
                "layer": features.attrs.get("layer"), "skipped": int(features.attrs.get("n_skipped", 0))}
