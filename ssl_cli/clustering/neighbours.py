"""Every image's K nearest other images by cosine similarity: the neighbours SCAN trains on.

Exact search costs N^2 x D multiply-adds (840 TFLOP at ImageNet's 1,281,167 rows and D = 256: hours on a
CPU). `mine_neighbours` picks how to search (`method`):

- exact: the L2-normalised rows in blocks of queries, a matmul against every row and a top-k, on the
  device the features are on (or `device`): CUDA when they are there. `auto` below `exact_max_rows` rows.
- ivf: a faiss IndexIVFFlat, inner product on the L2-normalised rows (= cosine). nlist = 4 sqrt(N) lists
  (at most N / 39, faiss's minimum of training rows per list), their centroids a spherical k-means of a
  seeded sample of 50 rows per list; then `nprobe`, the lists each query scans, is the smallest step of
  NPROBE_STEPS whose recall@K against the exact neighbours of CALIBRATION_QUERIES sampled rows reaches
  `recall_target` (0.95) by two standard errors, so the rows not sampled reach it too. On the GPUs when
  faiss has them (`faiss.get_num_gpus()`). `auto` above `exact_max_rows`.
- hnsw: a faiss IndexHNSWFlat (M = 32), efSearch calibrated the same way; CPU only, and its graph depends
  on the order threads insert the rows, so two builds can differ slightly (ivf's are identical).

Without faiss, `auto` mines exactly and warns once; an explicit ivf or hnsw is an error that says what to
install. bench/neighbours.py measures the three (bench/README.md, "Neighbour mining").
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ssl_cli.clustering.kmeans import import_faiss
from ssl_cli.errors import UserError

METHODS = ("auto", "exact", "ivf", "hnsw")
EXACT_MAX_ROWS = 100_000  # `auto` mines exactly up to this many rows (bench/README.md, "Neighbour mining")
RECALL_TARGET = 0.95  # recall@K an approximate index is calibrated to reach
CALIBRATION_QUERIES = 1000  # sampled rows whose exact neighbours calibrate nprobe / efSearch
CALIBRATION_Z = 2.0  # standard errors of the sampled rows' mean recall kept above the target
SIMILARITY_BUDGET = {"cpu": 1 << 26, "cuda": 1 << 28}  # similarity entries per exact block (256 MiB / 1 GiB)
QUERY_BLOCK = 1024  # at most this many query rows per exact block
SEARCH_BLOCK = 32768  # query rows per faiss search call (one progress step)
IVF_LISTS_PER_SQRT_ROW = 4  # nlist = 4 sqrt(N)
IVF_TRAIN_ROWS_PER_LIST = 50  # rows sampled per list to train the centroids
IVF_MIN_ROWS_PER_LIST = 39  # faiss warns below 39 training rows per centroid
IVF_TRAIN_ITERATIONS = 10  # faiss's own default for an IVF quantizer
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
GPU_MAX_NPROBE = 2048  # faiss's GPU IVF limit
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 80
EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)


@dataclass(frozen=True)
class Neighbours:
    """What `search_neighbours` found and how.

    indices (Q, k) int64 and distances (Q, k) float32 (1 - cosine similarity), nearest first, one row per
    query row, the query's own row left out. `record` is what ran, for the artifact's attributes: method
    (exact, ivf or hnsw), approximate, and per method device / faiss_gpu, nlist, nprobe, train_rows,
    hnsw_m, ef_search, calibration_recall (recall@k on the calibration rows), recall_target, seed,
    exact_fallback_rows (queries the index found fewer than k others for, searched exactly),
    build_seconds and search_seconds."""

    indices: np.ndarray
    distances: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


def faiss_available() -> bool:
    try:
        import_faiss()
    except UserError:
        return False
    return True


def resolve_method(method: str, rows: int, exact_max_rows: int = EXACT_MAX_ROWS,
                   warn: Callable[[str], None] | None = None) -> str:
    """The search `method` runs for `rows` feature rows: exact, ivf or hnsw. `auto` is exact up to
    `exact_max_rows` rows, else ivf when faiss is installed, else exact after one warning."""
    if method not in METHODS:
        raise UserError(f"--neighbours-method {method!r} is not one of {', '.join(METHODS)}")
    if method in ("ivf", "hnsw"):
        require_faiss(method)
        return method
    if method == "exact" or rows <= exact_max_rows:
        return "exact"
    if not faiss_available():
        (warn or _warn)(f"faiss is not installed: mining the neighbours of {rows} rows exactly (N^2, slow); "
                        "pip install 'ssl-cli[cpu]' or 'ssl-cli[gpu]' for an approximate index")
        return "exact"
    return "ivf"


def require_faiss(method: str):
    try:
        return import_faiss()
    except UserError:
        raise UserError(f"--neighbours-method {method} needs faiss, which is not installed: pip install "
                        "'ssl-cli[cpu]' (faiss-cpu) or 'ssl-cli[gpu]'; or use --neighbours-method exact") from None


def mine_neighbours(features: torch.Tensor | np.ndarray, k: int, method: str = "auto", *,
                    rows: slice | np.ndarray | None = None, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> (indices (Q, k) int64, cosine distances (Q, k) float32), nearest first, each
    query's own row left out. Q = N, or len(rows) with `rows` (a slice or an index array of query rows,
    e.g. a torchrun rank's 1/W), mined against all N rows: the same rows as the full mining gives.
    `method`: auto, exact, ivf or hnsw (module docstring); `options` as `search_neighbours`."""
    found = search_neighbours(features, k, method, rows=rows, **options)
    return found.indices, found.distances


def search_neighbours(features: torch.Tensor | np.ndarray, k: int, method: str = "auto", *,
                      rows: slice | np.ndarray | None = None, exact_max_rows: int = EXACT_MAX_ROWS,
                      recall_target: float = RECALL_TARGET, seed: int = 0,
                      device: str | torch.device | None = None, nlist: int | None = None,
                      nprobe: int | None = None, ef_search: int | None = None,
                      warn: Callable[[str], None] | None = None,
                      advance: Callable[[int], None] | None = None) -> Neighbours:
    """`mine_neighbours` with what ran (`Neighbours.record`).

    features (N, D) float; rows: query rows (default all). exact_max_rows: `auto`'s switch to ivf.
    recall_target: recall@k the index's nprobe / efSearch is calibrated to (unless `nprobe` / `ef_search`
    is given). seed: the training and calibration samples. device: where exact search runs (default the
    features' device) and whether faiss may use its GPUs ("cpu": no). nlist: IVF lists (default 4 sqrt(N)).
    warn: called with the one-line warning of `auto` without faiss. advance: called with the query rows done."""
    features = torch.as_tensor(features)
    n = len(features)
    if k >= n:
        raise UserError(f"--neighbours-k {k} needs more than {k} images, the data has {n}; lower --neighbours-k")
    if k < 1:
        raise UserError(f"--neighbours-k {k} must be at least 1")
    queries = query_rows(rows, n)
    chosen = resolve_method(method, n, exact_max_rows, warn)
    device = torch.device(device) if device is not None else features.device
    advance = advance or (lambda done: None)
    began = time.perf_counter()
    unit = F.normalize(features.to(device=device, dtype=torch.float32), dim=1)
    if chosen == "exact":
        indices, distances = exact_neighbours(unit, k, queries, advance)
        return Neighbours(indices, distances, {"method": "exact", "approximate": False, "device": device.type,
                                               "search_seconds": round(time.perf_counter() - began, 3)})
    faiss = require_faiss(chosen)
    gpu = chosen == "ivf" and device.type != "cpu" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    host = np.ascontiguousarray(unit.cpu().numpy())
    if chosen == "ivf":
        index, record = ivf_index(faiss, host, seed, gpu, nlist)
        steps = [step for step in NPROBE_STEPS if step < record["nlist"]] + [record["nlist"]]
        steps = [step for step in steps if not gpu or step <= GPU_MAX_NPROBE]
        name, given = "nprobe", nprobe
    else:
        index, record = hnsw_index(faiss, host)
        steps = [step for step in EF_SEARCH_STEPS if step > k] or [EF_SEARCH_STEPS[-1]]
        name, given = "ef_search", ef_search
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()

    def search(query: np.ndarray, value: int) -> tuple[np.ndarray, np.ndarray]:
        space.set_index_parameter(index, "nprobe" if name == "nprobe" else "efSearch", int(value))
        return index_search(index, host, query, k)

    record.update(method=chosen, approximate=True, faiss_gpu=bool(gpu), seed=seed,
                  build_seconds=round(time.perf_counter() - began, 3))
    if given is None:
        sample = np.sort(np.random.default_rng([seed, 1]).choice(n, min(CALIBRATION_QUERIES, n), replace=False))
        truth, _ = exact_neighbours(unit, k, sample, lambda done: None)
        given, recall = calibrate(lambda value: search(sample, value)[0], steps, truth, recall_target)
        record.update(calibration_queries=len(sample), calibration_recall=round(recall, 4),
                      recall_target=recall_target)
    record[name] = int(given)
    started = time.perf_counter()
    indices = np.empty((len(queries), k), dtype=np.int64)
    distances = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), SEARCH_BLOCK):
        block = queries[start : start + SEARCH_BLOCK]
        indices[start : start + len(block)], distances[start : start + len(block)] = search(block, given)
        advance(len(block))
    short = np.flatnonzero((indices < 0).any(1))  # the probed lists held fewer than k others
    if len(short):
        indices[short], distances[short] = exact_neighbours(unit, k, queries[short], lambda done: None)
    record.update(exact_fallback_rows=len(short), search_seconds=round(time.perf_counter() - started, 3))
    return Neighbours(indices, distances, record)


def query_rows(rows: slice | np.ndarray | None, n: int) -> np.ndarray:
    """The query rows as an int64 index array into the N feature rows."""
    if rows is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(rows, slice):
        return np.arange(n, dtype=np.int64)[rows]
    queries = np.asarray(rows)
    if queries.ndim != 1 or not np.issubdtype(queries.dtype, np.integer):
        raise ValueError(f"rows must be a slice or a 1-d integer array, not {queries.dtype} {queries.shape}")
    if len(queries) and (queries.min() < 0 or queries.max() >= n):
        raise ValueError(f"rows must lie in [0, {n}), got {queries.min()}..{queries.max()}")
    return queries.astype(np.int64)


def exact_neighbours(unit: torch.Tensor, k: int, queries: np.ndarray,
                     advance: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray]:
    """unit (N, D) L2-normalised rows, queries (Q,) row indices -> (Q, k) int64 indices and float32
    distances, nearest first, each query's own row left out. Memory: one (block, N) similarity block."""
    n = len(unit)
    budget = SIMILARITY_BUDGET["cuda" if unit.device.type == "cuda" else "cpu"]
    block_rows = max(1, min(QUERY_BLOCK, budget // n))
    indices = np.empty((len(queries), k), dtype=np.int64)
    distances = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), block_rows):
        block = torch.from_numpy(queries[start : start + block_rows]).to(unit.device)
        similarity = unit[block] @ unit.T
        similarity[torch.arange(len(block), device=unit.device), block] = -float("inf")  # not its own neighbour
        top, index = similarity.topk(k, dim=1)
        indices[start : start + len(block)] = index.cpu().numpy()
        distances[start : start + len(block)] = (1 - top).cpu().numpy()
        advance(len(block))
    return indices, distances


def ivf_index(faiss, unit: np.ndarray, seed: int, gpu: bool, nlist: int | None = None):
    """An IndexIVFFlat (inner product) holding unit (N, D) float32, its centroids a spherical k-means of a
    seeded sample; on all of faiss's GPUs when `gpu`. Returns (index, record of nlist and train_rows)."""
    n, dim = unit.shape
    if nlist is None:
        nlist = min(round(IVF_LISTS_PER_SQRT_ROW * math.sqrt(n)), n // IVF_MIN_ROWS_PER_LIST)
    nlist = max(1, min(nlist, n))
    train_rows = min(n, nlist * IVF_TRAIN_ROWS_PER_LIST)
    sample = np.sort(np.random.default_rng([seed, 0]).choice(n, train_rows, replace=False))
    kmeans = faiss.Kmeans(dim, nlist, niter=IVF_TRAIN_ITERATIONS, seed=seed, spherical=True, gpu=gpu,
                          max_points_per_centroid=IVF_TRAIN_ROWS_PER_LIST, verbose=False)
    kmeans.train(unit[sample])
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(np.ascontiguousarray(kmeans.centroids, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(unit[sample[: min(len(sample), nlist)]])  # the quantizer holds nlist centroids: no clustering
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    for start in range(0, n, SEARCH_BLOCK * 8):
        index.add(unit[start : start + SEARCH_BLOCK * 8])
    return index, {"nlist": int(nlist), "train_rows": int(train_rows)}


def hnsw_index(faiss, unit: np.ndarray):
    """An IndexHNSWFlat (inner product, M = HNSW_M) holding unit (N, D) float32. Returns (index, record)."""
    index = faiss.IndexHNSWFlat(unit.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(unit)
    return index, {"hnsw_m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}


def index_search(index, unit: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest others of unit[queries] in `index`: (Q, k) int64 indices (-1 where fewer were found) and
    float32 cosine distances. Searches k + 1 and drops the query's own row (or, when the index did not
    return it, the farthest)."""
    similarity, labels = index.search(np.ascontiguousarray(unit[queries]), k + 1)
    own = labels == queries[:, None]
    own[~own.any(1), -1] = True  # exactly one column dropped per row
    keep = ~own
    labels = labels[keep].reshape(len(queries), k).astype(np.int64)
    distances = (1 - similarity[keep].reshape(len(queries), k)).astype(np.float32)
    return labels, distances


def calibrate(search: Callable[[int], np.ndarray], steps: list[int], truth: np.ndarray,
              target: float) -> tuple[int, float]:
    """The first of `steps` whose `search(step)` (Q, k) indices reach recall@k `target` against `truth`
    (Q, k) with CALIBRATION_Z standard errors to spare, and its recall; the last step (and its recall) when
    none does. The margin is for the rows not sampled: at 80k rows a calibration recall of 0.951 (nprobe 32,
    no margin) was 0.949 on 500 other rows."""
    recall = 0.0
    for step in steps:
        per_row = row_hits(np.asarray(search(step)), truth) / max(truth.shape[1], 1)
        recall = float(per_row.mean()) if per_row.size else 1.0
        spare = CALIBRATION_Z * float(per_row.std()) / math.sqrt(max(len(per_row), 1))
        if recall - spare >= target:
            break
    return step, recall


def row_hits(approx_indices: np.ndarray, exact_indices: np.ndarray) -> np.ndarray:
    """(Q,) int64: how many of each row's exact neighbours (Q, k) the approximate search (Q, k' columns, any
    order) found; rows of -1 find none."""
    hits = [(approx_indices[start:start + 65536, :, None] == exact_indices[start:start + 65536, None, :]).any(1).sum(1)
            for start in range(0, len(exact_indices), 65536)]  # bounds the (rows, k', k) comparison
    return np.concatenate(hits).astype(np.int64) if hits else np.zeros(0, dtype=np.int64)


def recall_at_k(approx_indices: np.ndarray, exact_indices: np.ndarray) -> float:
    """The fraction of the exact neighbours (Q, k) that the approximate search found (Q, k' columns, any
    order): mean over rows of |approx row & exact row| / k. Rows of -1 count as misses."""
    approx_indices, exact_indices = np.asarray(approx_indices), np.asarray(exact_indices)
    if len(approx_indices) != len(exact_indices):
        raise ValueError(f"recall_at_k needs as many rows of each: {len(approx_indices)} != {len(exact_indices)}")
    if exact_indices.size == 0:
        return 1.0
    return int(row_hits(approx_indices, exact_indices).sum()) / exact_indices.size


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def mining_settings(k: int, method: str) -> dict[str, Any]:
    """What changes the mined neighbours, for a neighbours file's fingerprint: K, and for an index its
    method and recall target (exact neighbours are the same however they are searched, so `auto` and
    `exact` share a file when `auto` resolves to exact). `method` as `resolve_method` returns it."""
    return {"neighbours_k": k} if method == "exact" else {"neighbours_k": k, "method": method,
                                                           "recall_target": RECALL_TARGET,
                                                           "calibration_z": CALIBRATION_Z}
