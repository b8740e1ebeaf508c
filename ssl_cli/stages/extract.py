"""`ssl extract`: one feature row per image from a named layer, streamed to HDF5 in resumable chunks."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_cli.artifacts.h5 import H5Artifact, RowWriter
from ssl_cli.artifacts.lock import claim_scope
from ssl_cli.artifacts.outputs import OutputState, plan_output
from ssl_cli.artifacts.schema import Provenance, make_provenance
from ssl_cli.config import ExtractConfig
from ssl_cli.data.dataset import SourceDataset
from ssl_cli.data.sources import ImageSource, open_source, source_input
from ssl_cli.data.transforms import eval_transform
from ssl_cli.device import autocast, prepare_module, resolve_device, to_device
from ssl_cli.errors import UserError
from ssl_cli.models.layers import LayerReader
from ssl_cli.models.network import Network, network_from_arch, network_from_checkpoint
from ssl_cli.models.registry import check_layer, get_arch
from ssl_cli.report import Reporter, SilentReporter
from ssl_cli.stages import StageResult

# Rows are flushed every FLUSH_BATCHES batches; a resumed run restarts at a batch boundary of the
# uninterrupted run, so every row sees the same batch and the file ends byte-identical.
FLUSH_BATCHES = 8


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
    reader = prepare_module(reader, device)
    dim = feature_dim(reader, network.input_size, device)
    writer = RowWriter.resume(cfg.out, provenance.fingerprint) if plan.state is OutputState.RESUME else None
    resumed = writer is not None
    if writer is None:
        writer = RowWriter.create(
            cfg.out, provenance,
            columns={"features": ((dim,), cfg.dtype), "sample_ids": ((), str), "targets": ((), np.int64)},
        )
        writer.set_attrs(source_done=0, n_skipped=0, layer=layer, arch=network.spec.name, dim=dim, classes=source.classes)
    try:
        skipped = stream_features(cfg, source, network, reader, device, writer, reporter)
    except UserError:
        writer.discard()  # NaN features come back on every re-run of the same inputs: nothing to resume
        raise
    except BaseException:
        writer.close()  # flushed blocks stay in <out>.partial; the same command resumes from them
        raise
    rows = writer.rows_done
    writer.commit()
    if skipped:
        reporter.warn(f"skipped {len(skipped)} unreadable image(s), e.g. {', '.join(skipped[:3])}; named in {cfg.out}")
    summary = {"rows": rows, "dim": dim, "layer": layer, "skipped": len(skipped), "resumed": resumed}
    return StageResult("extract", cfg.out, "resumed" if resumed else "written", summary)


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
                    device: torch.device, writer: RowWriter, reporter: Reporter) -> list[str]:
    """Read batches from `source_done` on, append whole blocks, record progress after each block."""
    start = int(writer.get_attr("source_done", 0))
    skipped = list(writer.handle["skipped_ids"].asstr()[...]) if "skipped_ids" in writer.handle else []
    # ids written by a block whose rows never counted as done are named again when it is re-read
    skipped = skipped[: int(writer.get_attr("n_skipped", 0))]
    dataset = SourceDataset(source, eval_transform(network.input_size, network.mean, network.std,
                                                           network.per_image_normalise, network.input_mode),
                            indices=range(start, len(source)),
                            placeholder_shape=(3, network.input_size, network.input_size))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    store = np.float16 if cfg.dtype == "float16" else np.float32
    block: list[tuple[np.ndarray, np.ndarray]] = []
    done = start
    began = time.perf_counter()
    with reporter.progress(f"extract {writer.get_attr('layer')}", total=len(source), completed=start) as advance, \
            torch.inference_mode():
        for batch, (images, indices, ok) in enumerate(loader, start=1):
            with autocast(device):
                features = reader(to_device(images, device)).float()
            if not torch.isfinite(features).all():
                raise UserError(f"the network produced NaN/inf features for images near {source.sample_ids[int(indices[0])]}; "
                                "check the checkpoint (a diverged training run?)")
            block.append((features.cpu().numpy().astype(store), indices.numpy(), ok.numpy()))
            done += len(indices)
            advance(len(indices))
            if batch % FLUSH_BATCHES == 0 or done == len(source):
                skipped += flush(block, source, writer, skipped, done)
                block = []
    writer.set_attrs(images_per_second=(done - start) / max(time.perf_counter() - began, 1e-9))
    return skipped


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
